// Package daemonproc starts `forkd serve` as a child process and waits until
// its API answers. The fork-burst benchmark and the reliability suite each
// drive daemons they own through it. Stopping a daemon never touches its
// VMMs (they live in their own sessions and outlive it); only Teardown,
// which ends a data dir for good, deletes its VMs and kills what is left.
package daemonproc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/network"
)

// startTimeout bounds the wait for GET /health after the process started.
const startTimeout = 30 * time.Second

// Spec says how to start one daemon.
type Spec struct {
	Binary  string   // the forkd binary
	DataDir string   // its --data-dir (short: VMM socket paths must fit 108 bytes)
	Args    []string // extra `forkd serve` flags
	// Env is added to PATH and HOME, the only variables passed on from the
	// caller: no FORKD_* setting of the caller's may configure the daemon.
	Env     []string
	LogPath string // the daemon's stdout and stderr, appended to (across restarts)
	// ParentDeathSignal, when set, is sent to the daemon if the thread that
	// started it exits (Linux's PDEATHSIG): for a daemon that must not
	// outlive a short-lived caller such as `forkd demo`.
	ParentDeathSignal syscall.Signal
	// NetNS, when set, is a network namespace (path) the daemon runs in:
	// networking tests make one so nothing they do reaches the host's
	// network.
	NetNS string
}

// Proc is one running (or exited) `forkd serve` child.
type Proc struct {
	Spec   Spec
	Layout guestdir.Layout
	Client *api.Client

	cmd    *exec.Cmd
	exited chan struct{} // closed once the process is reaped
}

// Start starts `forkd serve --data-dir DIR` and waits until GET /health
// answers. On failure the process is killed and the error ends with the
// tail of its log.
func Start(ctx context.Context, s Spec) (*Proc, error) {
	layout, err := guestdir.New(s.DataDir)
	if err != nil {
		return nil, fmt.Errorf("start daemon: %w", err)
	}
	logf, err := os.OpenFile(s.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("start daemon: open log: %w", err)
	}
	defer logf.Close()
	args := append([]string{"serve", "--data-dir", layout.Root()}, s.Args...)
	cmd := exec.Command(s.Binary, args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}, s.Env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if s.ParentDeathSignal != 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: s.ParentDeathSignal}
	}
	start := cmd.Start
	if s.NetNS != "" {
		start = func() error { return network.Do(s.NetNS, cmd.Start) }
	}
	if err := start(); err != nil {
		return nil, fmt.Errorf("start daemon %s: %w", s.Binary, err)
	}
	p := &Proc{Spec: s, Layout: layout, cmd: cmd, exited: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.exited) }()
	if p.Client, err = api.NewClient(layout.Socket()); err != nil {
		p.Kill()
		return nil, fmt.Errorf("start daemon: %w", err)
	}
	wctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	if _, err := p.Client.WaitHealthy(wctx, p.exited); err != nil {
		if errors.Is(err, api.ErrDaemonExited) {
			err = fmt.Errorf("daemon exited: %v", cmd.ProcessState)
		}
		p.Kill()
		return nil, fmt.Errorf("start daemon (log %s): %w%s", s.LogPath, err, p.LogTail())
	}
	return p, nil
}

// Pid is the daemon's process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Exited is closed once the daemon process has exited and been reaped.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// WaitStatus is how the daemon ended; valid once Exited is closed.
func (p *Proc) WaitStatus() syscall.WaitStatus {
	ws, _ := p.cmd.ProcessState.Sys().(syscall.WaitStatus)
	return ws
}

// Kill SIGKILLs the daemon and reaps it. Its VMMs (own sessions) live on.
func (p *Proc) Kill() {
	_ = p.cmd.Process.Kill()
	<-p.exited
	if p.Client != nil {
		p.Client.Close()
	}
}

// Terminate stops the daemon gracefully (SIGTERM) and waits for it to exit,
// SIGKILLing it if it has not within timeout (none when timeout <= 0) or
// before ctx ends. Its VMMs keep running.
func (p *Proc) Terminate(ctx context.Context, timeout time.Duration) error {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	var expire <-chan time.Time
	if timeout > 0 {
		expire = time.After(timeout)
	}
	select {
	case <-p.exited:
		return nil
	case <-ctx.Done():
		p.Kill()
		return fmt.Errorf("daemon pid %d ignored SIGTERM: %w", p.Pid(), ctx.Err())
	case <-expire:
		p.Kill()
		return fmt.Errorf("daemon pid %d ignored SIGTERM for %v", p.Pid(), timeout)
	}
}

// Teardown is how a caller that owns the whole data dir ends it: it
// deletes every instance and snapshot through the API (deleting is what
// stops VMMs, which outlive the daemon), stops the daemon (SIGTERM, then
// SIGKILL after timeout), SIGKILLs any process still under the data dir (a
// VMM or pager left behind), and removes the data dir's jail cgroups once
// those VMMs have left them (the daemon removes them itself only when it
// exits with no VMM left). Nothing it started survives it on the host,
// neither a process nor a cgroup; one still held by a process when ctx
// ends is an error.
func (p *Proc) Teardown(ctx context.Context, timeout time.Duration) error {
	var errs []error
	select {
	case <-p.exited:
	default:
		if err := api.DeleteAll(ctx, p.Client); err != nil {
			errs = append(errs, err)
		}
		p.Client.Close()
		if err := p.Terminate(ctx, timeout); err != nil {
			errs = append(errs, err)
		}
	}
	for _, q := range ProcessesUnder(p.Layout.Root()) {
		_ = syscall.Kill(q.Pid, syscall.SIGKILL)
	}
	if err := jail.RemoveHostTree(ctx, jail.DataDirParent(network.Tag(p.Layout.Root()))); err != nil {
		errs = append(errs, fmt.Errorf("the data dir's jail cgroups: %w", err))
	}
	return errors.Join(errs...)
}

// LogTail is the end of the daemon's log, for failure messages.
func (p *Proc) LogTail() string {
	b, err := os.ReadFile(p.Spec.LogPath)
	if err != nil || len(b) == 0 {
		return ""
	}
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return "\ndaemon log ends:\n" + strings.TrimRight(string(b), "\n")
}
