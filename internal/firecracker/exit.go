package firecracker

import (
	"errors"
	"fmt"
	"os/exec"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/pidwatch"
)

// Exit is how a VMM process ended, as far as this process can know it.
type Exit struct {
	// Known is false for a VMM this process did not start (one adopted
	// after a daemon restart): only its parent can learn a process's wait
	// status.
	Known bool
	// Status is the wait status when Known: the exit code, or the signal
	// that killed it (SIGSYS is a seccomp violation; SIGKILL may be the
	// OOM killer or a cgroup's memory limit).
	Status syscall.WaitStatus
}

func (e Exit) String() string {
	switch {
	case !e.Known:
		return "exited (status unknown: adopted after a daemon restart, not this daemon's child)"
	case e.Status.Signaled():
		sig := e.Status.Signal()
		return fmt.Sprintf("killed by signal %d (%s)", int(sig), unix.SignalName(sig))
	default:
		return fmt.Sprintf("exited with status %d", e.Status.ExitStatus())
	}
}

// Done returns a channel that is closed once the process has exited. For a
// child it is the reaper's; for an adopted process a pidfd is watched
// (internal/pidwatch, started on the first call, until the process exits or
// Release). An exit is an event: nothing polls.
func (p *Process) Done() <-chan struct{} {
	if p.exited != nil {
		return p.exited
	}
	if p.watch == nil {
		// A Process built by hand (tests): it never reports an exit.
		return nil
	}
	return p.watch.start(p.Pid, p.startTime)
}

// Exit says how the process ended; meaningful once Done is closed.
func (p *Process) Exit() Exit {
	if p.exited == nil {
		return Exit{}
	}
	select {
	case <-p.exited:
	default:
		return Exit{}
	}
	if p.waitErr == nil {
		return Exit{Known: true} // status 0
	}
	var ee *exec.ExitError
	if errors.As(p.waitErr, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok {
			return Exit{Known: true, Status: ws}
		}
	}
	return Exit{}
}

// Release stops watching an adopted process: its pidfd is closed and Done's
// channel never closes unless it already had. A child needs no release (the
// reaper ends with it). Safe to call more than once.
func (p *Process) Release() {
	if p.watch != nil {
		p.watch.release()
	}
}

// pidWatch is an adopted process's exit watch, made on first use.
type pidWatch struct {
	mu       sync.Mutex // guards w, closed and released
	w        *pidwatch.Watch
	closed   chan struct{} // Done when no pidfd can be had: the process is gone
	never    chan struct{} // Done after Release, or without pidfd support
	released bool
}

func newPidWatch() *pidWatch { return &pidWatch{} }

func (pw *pidWatch) start(pid int, startTime uint64) <-chan struct{} {
	pw.mu.Lock()
	defer pw.mu.Unlock()
	switch {
	case pw.w != nil:
		return pw.w.Done()
	case pw.closed != nil:
		return pw.closed
	case pw.released || pw.never != nil:
		if pw.never == nil {
			pw.never = make(chan struct{})
		}
		return pw.never
	}
	w, err := pidwatch.New(pid)
	if err != nil {
		pw.never = make(chan struct{}) // no pidfd (an old kernel): no exit event
		return pw.never
	}
	// The pidfd pins the pid now: if it names another process, or a
	// zombie, ours has exited.
	if st, err := readStat(pid); !w.Exited() && (err != nil || (startTime != 0 && st.startTime != startTime) || st.state == 'Z' || st.state == 'X') {
		w.Release()
		pw.closed = make(chan struct{})
		close(pw.closed)
		return pw.closed
	}
	pw.w = w
	return w.Done()
}

func (pw *pidWatch) release() {
	pw.mu.Lock()
	defer pw.mu.Unlock()
	pw.released = true
	if pw.w != nil {
		pw.w.Release()
	}
}
