// Package pidwatch turns a process's exit into an event. It watches a
// pidfd, which polls readable once the process has exited and, unlike a
// pid, can never come to name another process, with one goroutine parked
// in the netpoller: nothing polls /proc, and a process that is not this
// one's child (a VMM or pager adopted after a daemon restart) can be
// watched too. It never signals or reaps the process.
package pidwatch

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Watch is one watched process.
type Watch struct {
	pid  int
	done chan struct{} // closed once the process has exited

	mu       sync.Mutex // guards f and released
	f        *os.File   // the pidfd while watched
	released bool
}

// New starts watching pid. A pid that no longer exists gives a Watch whose
// Done is already closed. The caller checks, after New, that pid is still
// the process it means (the pidfd pins it from here on) and Releases the
// watch if not.
func New(pid int) (*Watch, error) {
	w := &Watch{pid: pid, done: make(chan struct{})}
	if pid <= 0 {
		return nil, fmt.Errorf("pidwatch: invalid pid %d", pid)
	}
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if errors.Is(err, unix.ESRCH) {
		close(w.done)
		return w, nil
	}
	if err != nil {
		return nil, fmt.Errorf("pidwatch: pidfd_open %d: %w", pid, err)
	}
	w.f = os.NewFile(uintptr(fd), "pidfd")
	rc, err := w.f.SyscallConn()
	if err != nil {
		w.f.Close()
		return nil, fmt.Errorf("pidwatch: %d: %w", pid, err)
	}
	go w.wait(rc)
	return w, nil
}

// Pid is the watched process id.
func (w *Watch) Pid() int { return w.pid }

// Done is closed once the process has exited (never, after Release, if it
// had not).
func (w *Watch) Done() <-chan struct{} { return w.done }

// Exited reports whether Done is closed.
func (w *Watch) Exited() bool {
	select {
	case <-w.done:
		return true
	default:
		return false
	}
}

// wait blocks until the pidfd is readable (the process exited) or closed
// (Release).
func (w *Watch) wait(rc interface {
	Read(func(uintptr) bool) error
}) {
	// Readiness is checked at its level inside the wait, so an exit that
	// happened before the fd joined the netpoller is not missed.
	err := rc.Read(func(fd uintptr) bool {
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
		return err == nil && n > 0
	})
	w.mu.Lock()
	defer w.mu.Unlock()
	if err == nil && !w.released {
		close(w.done)
	}
	if w.f != nil {
		w.f.Close()
		w.f = nil
	}
}

// Release stops watching: the pidfd is closed and the goroutine ends. Safe
// to call more than once.
func (w *Watch) Release() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.released = true
	if w.f != nil {
		w.f.Close() // wakes wait, which returns without closing done
		w.f = nil
	}
}
