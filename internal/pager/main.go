package pager

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
)

// MainOptions are `forkd pager serve`'s flags.
type MainOptions struct {
	Dir        string
	CacheBytes int64
	Version    string
	// LogPath is appended to ("" = stderr); LogFormat is "text" or "json".
	LogPath   string
	LogFormat string
	Stderr    io.Writer
	// DefaultPriority keeps the default CPU priority instead of pagerNice
	// (priority.go). It exists only for the test that shows its check
	// catches a pager left at the default; never set it elsewhere.
	DefaultPriority bool
}

// Main runs a pager process until it has drained or is stopped. The first
// SIGTERM or SIGINT drains (VMs keep being served until they exit); a
// second one stops at once, which freezes VMs still being served.
func Main(ctx context.Context, opt MainOptions) error {
	if opt.Dir == "" {
		return fmt.Errorf("pager serve: --dir is required")
	}
	out := opt.Stderr
	if out == nil {
		out = os.Stderr
	}
	if opt.LogPath != "" {
		f, err := os.OpenFile(opt.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return fmt.Errorf("pager serve: log: %w", err)
		}
		defer f.Close()
		out = f
	}
	var h slog.Handler
	switch opt.LogFormat {
	case "", "text":
		h = slog.NewTextHandler(out, nil)
	case "json":
		h = slog.NewJSONHandler(out, nil)
	default:
		return fmt.Errorf("pager serve: --log-format %q: want text or json", opt.LogFormat)
	}
	log := slog.New(h).With("component", "pager")
	// The heap is mostly the page cache: long-lived, pointer-free pages. A
	// low GC target keeps the process near its budget instead of the
	// default 2x of it; marking pointer-free pages costs next to nothing.
	debug.SetGCPercent(25)
	if !opt.DefaultPriority {
		if err := raisePriority(); err != nil {
			log.Warn("the pager runs at the default CPU priority: busy guests can starve it and stall the guests it serves", "nice", pagerNice, "err", err)
		}
	}
	srv, err := NewServer(Config{Dir: opt.Dir, CacheBytes: opt.CacheBytes, Version: opt.Version}, log)
	if err != nil {
		log.Error("pager failed to start", "err", err)
		return err
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, os.Interrupt)
	defer signal.Stop(sigs)
	go func() {
		drained := false
		for {
			select {
			case sig := <-sigs:
				if !drained {
					log.Info("signal: draining; send it again to stop now", "signal", sig.String())
					srv.Drain()
					drained = true
					continue
				}
				cancel(fmt.Errorf("second signal %s", sig))
				return
			case <-ctx.Done():
				return
			}
		}
	}()
	if err := srv.Serve(ctx); err != nil {
		log.Error("pager stopped", "err", err)
		return err
	}
	log.Info("pager exited")
	return nil
}
