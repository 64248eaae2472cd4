package bench

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/daemonproc"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/pager"
)

// DaemonSpec says how to start the benchmark's own daemon.
type DaemonSpec struct {
	Binary  string   // the forkd binary (`forkd serve`)
	DataDir string   // a data dir the benchmark owns: everything in it is deleted at Stop
	Args    []string // extra `forkd serve` flags, e.g. --vmm-binary PATH
	LogPath string   // the daemon's stderr; default DataDir/../daemon.log
}

// Daemon is a `forkd serve` child of the benchmark.
type Daemon struct {
	DataDir string
	Client  *api.Client
	LogPath string

	proc *daemonproc.Proc
}

// StartDaemon starts `forkd serve --data-dir DIR` with a minimal environment
// (no FORKD_* variable of ours may configure it) and waits until its API
// answers GET /health.
func StartDaemon(ctx context.Context, spec DaemonSpec) (*Daemon, error) {
	if spec.LogPath == "" {
		spec.LogPath = filepath.Join(filepath.Dir(spec.DataDir), "daemon.log")
	}
	p, err := daemonproc.Start(ctx, daemonproc.Spec{Binary: spec.Binary, DataDir: spec.DataDir, Args: spec.Args, LogPath: spec.LogPath})
	if err != nil {
		return nil, err
	}
	return &Daemon{DataDir: p.Layout.Root(), Client: p.Client, LogPath: spec.LogPath, proc: p}, nil
}

// Pid is the daemon's process id.
func (d *Daemon) Pid() int { return d.proc.Pid() }

// Stop deletes every instance and snapshot of the daemon (the data dir is
// the benchmark's: this is what stops their VMMs, which outlive the
// daemon), stops the daemon with SIGTERM, and drains its pagers.
func (d *Daemon) Stop(ctx context.Context) error {
	var errs []error
	if err := api.DeleteAll(ctx, d.Client); err != nil {
		errs = append(errs, err)
	}
	d.Client.Close()
	if err := d.proc.Terminate(ctx, 0); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, drainPagers(ctx, d.DataDir))
	return errors.Join(errs...)
}

// drainPagers asks every pager of the data dir to exit once idle (POST
// /drain on its control socket, docs/architecture.md §8): pagers are detached from the
// daemon and would otherwise outlive the benchmark.
func drainPagers(ctx context.Context, dataDir string) error {
	layout, err := guestdir.New(dataDir)
	if err != nil {
		return err
	}
	socks, _ := filepath.Glob(pager.ControlSocket(filepath.Join(layout.PagerRoot(), "*")))
	var errs []error
	for _, sock := range socks {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := pager.NewClient(sock).Drain(rctx)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("drain pager %s: %w", sock, err))
		}
	}
	return errors.Join(errs...)
}
