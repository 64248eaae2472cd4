package reliability

import (
	"context"
	"fmt"
	"path/filepath"
	"syscall"
	"time"

	"github.com/forkd/forkd/internal/daemonproc"
)

// DaemonOptions say how to start a `forkd serve` process (PATH, HOME and
// Env are its whole environment; Env carries e.g.
// FORKD_TEST_CRASH_AT=standby:created).
type DaemonOptions = daemonproc.Spec

// Daemon is one `forkd serve` process the suite started.
type Daemon struct {
	*daemonproc.Proc
}

// StartDaemon starts `forkd serve --data-dir DIR` and waits until GET
// /health answers. The log defaults to DIR.log beside the data dir.
func StartDaemon(ctx context.Context, opts DaemonOptions) (*Daemon, error) {
	if opts.LogPath == "" {
		dir := filepath.Clean(opts.DataDir)
		opts.LogPath = filepath.Join(filepath.Dir(dir), filepath.Base(dir)+".log")
	}
	p, err := daemonproc.Start(ctx, opts)
	if err != nil {
		return nil, err
	}
	return &Daemon{p}, nil
}

// WaitExit waits up to timeout for the daemon to exit on its own (the crash
// hook) and reports how it ended.
func (d *Daemon) WaitExit(timeout time.Duration) (syscall.WaitStatus, error) {
	select {
	case <-d.Exited():
		return d.WaitStatus(), nil
	case <-time.After(timeout):
		return 0, fmt.Errorf("daemon pid %d still running after %v", d.Pid(), timeout)
	}
}

// Stop stops the daemon gracefully (SIGTERM) and waits for it to exit;
// its VMMs keep running.
func (d *Daemon) Stop() error {
	return d.Terminate(context.Background(), 30*time.Second)
}

// Restart starts a new daemon on the same data dir with env (the old one
// must have exited).
func (d *Daemon) Restart(ctx context.Context, env []string) (*Daemon, error) {
	select {
	case <-d.Exited():
	default:
		return nil, fmt.Errorf("restart: daemon pid %d is still running", d.Pid())
	}
	d.Client.Close()
	opts := d.Spec
	opts.Env = env
	return StartDaemon(ctx, opts)
}

// Shutdown deletes every instance and snapshot through the API (which stops
// their VMMs), SIGTERMs the daemon, then SIGKILLs any VMM or pager process
// still running under the data dir: a test leaves no process behind.
func (d *Daemon) Shutdown(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	return d.Teardown(ctx, 30*time.Second)
}
