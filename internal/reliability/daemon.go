package reliability

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
)

// DaemonOptions say how to start a `forkd serve` process.
type DaemonOptions struct {
	Binary  string   // the forkd binary
	DataDir string   // the daemon's data dir (short: VMM socket paths must fit 108 bytes)
	Args    []string // extra `forkd serve` flags
	Env     []string // extra environment, e.g. FORKD_TEST_CRASH_AT=standby:created
	LogPath string   // the daemon's stderr, appended to across restarts
}

// Daemon is one `forkd serve` process the suite started.
type Daemon struct {
	Opts   DaemonOptions
	Client *api.Client
	Layout guestdir.Layout

	cmd    *exec.Cmd
	exited chan struct{} // closed once the process is reaped
}

// StartDaemon starts `forkd serve --data-dir DIR` with a minimal
// environment (PATH, HOME and opts.Env) and waits until GET /health answers.
func StartDaemon(ctx context.Context, opts DaemonOptions) (*Daemon, error) {
	layout, err := guestdir.New(opts.DataDir)
	if err != nil {
		return nil, fmt.Errorf("start daemon: %w", err)
	}
	if opts.LogPath == "" {
		opts.LogPath = filepath.Join(filepath.Dir(layout.Root()), filepath.Base(layout.Root())+".log")
	}
	logf, err := os.OpenFile(opts.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("start daemon: open log: %w", err)
	}
	defer logf.Close()
	args := append([]string{"serve", "--data-dir", layout.Root()}, opts.Args...)
	cmd := exec.Command(opts.Binary, args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}, opts.Env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start daemon %s: %w", opts.Binary, err)
	}
	d := &Daemon{Opts: opts, Layout: layout, cmd: cmd, exited: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(d.exited) }()
	if d.Client, err = api.NewClient(layout.Socket()); err != nil {
		d.Kill()
		return nil, err
	}
	if err := d.waitHealthy(ctx); err != nil {
		d.Kill()
		return nil, fmt.Errorf("start daemon: %w%s", err, d.LogTail())
	}
	return d, nil
}

func (d *Daemon) waitHealthy(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_, err := d.Client.WaitHealthy(ctx, d.exited)
	if errors.Is(err, api.ErrDaemonExited) {
		return fmt.Errorf("daemon exited: %v", d.cmd.ProcessState)
	}
	return err
}

// Pid is the daemon's process id.
func (d *Daemon) Pid() int { return d.cmd.Process.Pid }

// Exited is closed once the daemon process has exited.
func (d *Daemon) Exited() <-chan struct{} { return d.exited }

// WaitExit waits up to timeout for the daemon to exit on its own (the crash
// hook) and reports how it ended.
func (d *Daemon) WaitExit(timeout time.Duration) (syscall.WaitStatus, error) {
	select {
	case <-d.exited:
		ws, _ := d.cmd.ProcessState.Sys().(syscall.WaitStatus)
		return ws, nil
	case <-time.After(timeout):
		return 0, fmt.Errorf("daemon pid %d still running after %v", d.Pid(), timeout)
	}
}

// Kill SIGKILLs the daemon and reaps it. Its VMMs (own sessions) live on.
func (d *Daemon) Kill() {
	_ = d.cmd.Process.Kill()
	<-d.exited
	if d.Client != nil {
		d.Client.Close()
	}
}

// Stop stops the daemon gracefully (SIGTERM) and waits for it to exit;
// its VMMs keep running.
func (d *Daemon) Stop() error {
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
		return nil
	case <-time.After(30 * time.Second):
		d.Kill()
		return fmt.Errorf("daemon pid %d ignored SIGTERM for 30s", d.Pid())
	}
}

// Restart starts a new daemon on the same data dir with env (the old one
// must have exited).
func (d *Daemon) Restart(ctx context.Context, env []string) (*Daemon, error) {
	select {
	case <-d.exited:
	default:
		return nil, fmt.Errorf("restart: daemon pid %d is still running", d.Pid())
	}
	if d.Client != nil {
		d.Client.Close()
	}
	opts := d.Opts
	opts.Env = env
	return StartDaemon(ctx, opts)
}

// Shutdown deletes every instance and snapshot through the API (which stops
// their VMMs), SIGTERMs the daemon, then SIGKILLs any VMM or pager process
// still running under the data dir: a test leaves no process behind.
func (d *Daemon) Shutdown(ctx context.Context) error {
	var errs []error
	select {
	case <-d.exited:
	default:
		ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		if err := api.DeleteAll(ctx, d.Client); err != nil {
			errs = append(errs, err)
		}
		d.Client.Close()
		_ = d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.exited:
		case <-time.After(30 * time.Second):
			d.Kill()
			errs = append(errs, fmt.Errorf("daemon ignored SIGTERM for 30s"))
		}
	}
	for _, p := range ProcessesUnder(d.Layout.Root()) {
		_ = syscall.Kill(p.Pid, syscall.SIGKILL)
	}
	return errors.Join(errs...)
}

// LogTail is the end of the daemon's log, for failure messages.
func (d *Daemon) LogTail() string {
	b, err := os.ReadFile(d.Opts.LogPath)
	if err != nil || len(b) == 0 {
		return ""
	}
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return "\ndaemon log ends:\n" + strings.TrimRight(string(b), "\n")
}
