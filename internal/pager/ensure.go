package pager

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// StartOptions say which pager EnsureRunning wants.
type StartOptions struct {
	// Binary is the forkd binary to run as `Binary pager serve ...`.
	Binary string
	// Dir is the pager's directory, <data>/pager/<version>.
	Dir string
	// Version is the version the pager must report.
	Version string
	// CacheBytes is the page cache budget of a pager started here.
	CacheBytes int64
	// StartTimeout bounds the wait for a started pager to answer (default 10 s).
	StartTimeout time.Duration
}

// EnsureRunning returns a client of a healthy pager of opt.Version in
// opt.Dir, starting one if none answers. A started pager is detached: its
// own session (setsid), stdio on /dev/null, logging to Dir/pager.log, so a
// daemon restart never takes it (and the VMs it serves) down. Pagers of
// other versions in sibling directories are asked to drain.
func EnsureRunning(ctx context.Context, opt StartOptions, log *slog.Logger) (*Client, error) {
	if opt.StartTimeout <= 0 {
		opt.StartTimeout = 10 * time.Second
	}
	c := NewClient(ControlSocket(opt.Dir))
	h, err := probe(ctx, c)
	if err != nil {
		if err := start(ctx, opt, log); err != nil {
			return nil, err
		}
		h, err = waitHealthy(ctx, c, opt.StartTimeout)
		if err != nil {
			return nil, fmt.Errorf("start pager in %s: %w (see %s)", opt.Dir, err, filepath.Join(opt.Dir, "pager.log"))
		}
	}
	if h.Version != opt.Version {
		return nil, fmt.Errorf("pager in %s is version %q, want %q: stop pid %d", opt.Dir, h.Version, opt.Version, h.Pid)
	}
	if h.Draining {
		return nil, fmt.Errorf("pager in %s (pid %d) is draining; retry once it has exited", opt.Dir, h.Pid)
	}
	drainOthers(ctx, opt, log)
	return c, nil
}

func probe(ctx context.Context, c *Client) (Health, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return c.Health(ctx)
}

// start runs the pager binary detached. A goroutine reaps it if it exits
// while we live (otherwise it would linger as a zombie); it does not keep
// the pager alive or tied to us.
func start(ctx context.Context, opt StartOptions, log *slog.Logger) error {
	out, err := exec.CommandContext(ctx, opt.Binary, "pager", "serve", "--version").Output()
	if err != nil {
		return fmt.Errorf("start pager: %s pager serve --version: %w", opt.Binary, err)
	}
	if v := strings.TrimSpace(string(out)); v != opt.Version {
		return fmt.Errorf("start pager: %s is version %q, want %q", opt.Binary, v, opt.Version)
	}
	if err := os.MkdirAll(opt.Dir, 0o700); err != nil {
		return fmt.Errorf("start pager: %w", err)
	}
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("start pager: %w", err)
	}
	defer devnull.Close()
	cmd := exec.Command(opt.Binary, "pager", "serve",
		"--dir", opt.Dir,
		"--cache-bytes", strconv.FormatInt(opt.CacheBytes, 10),
		"--log-path", filepath.Join(opt.Dir, "pager.log"))
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, devnull
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start pager %s: %w", opt.Binary, err)
	}
	log.Info("pager started", "pid", cmd.Process.Pid, "dir", opt.Dir, "version", opt.Version)
	go cmd.Wait()
	return nil
}

func waitHealthy(ctx context.Context, c *Client, timeout time.Duration) (Health, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		h, err := probe(ctx, c)
		if err == nil {
			return h, nil
		}
		last = err
		select {
		case <-ctx.Done():
			return Health{}, errors.Join(ctx.Err(), last)
		case <-tick.C:
		}
	}
}

// drainOthers asks pagers of other versions (sibling dirs of opt.Dir) to
// drain: they keep serving their VMs and exit after the last one. Failures
// are logged, never fatal.
func drainOthers(ctx context.Context, opt StartOptions, log *slog.Logger) {
	root := filepath.Dir(filepath.Clean(opt.Dir))
	ents, err := os.ReadDir(root)
	if err != nil {
		return
	}
	for _, e := range ents {
		dir := filepath.Join(root, e.Name())
		if !e.IsDir() || dir == filepath.Clean(opt.Dir) {
			continue
		}
		if _, err := os.Stat(ControlSocket(dir)); err != nil {
			continue
		}
		c := NewClient(ControlSocket(dir))
		h, err := probe(ctx, c)
		if err != nil || h.Version == opt.Version || h.Draining {
			continue
		}
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err = c.Drain(dctx)
		cancel()
		if err != nil {
			log.Warn("drain old pager", "dir", dir, "version", h.Version, "err", err)
			continue
		}
		log.Info("old pager draining", "dir", dir, "version", h.Version, "pid", h.Pid, "sessions", h.Sessions)
	}
}
