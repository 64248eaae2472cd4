package network

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NewUnnamedNamespace creates an empty network namespace (only a loopback,
// down) that no path names: it lives while the returned handle is open or
// a process is inside it, so nothing is left on the host when both are
// gone. A process joins it through /proc/<pid>/fd/<fd> of the holder (a
// jailer's --netns): the jail puts a VM without a network there, so its
// VMM reaches no network at all. Only the calling thread enters the new
// namespace, and it is back in its own before this returns.
func NewUnnamedNamespace() (f *os.File, err error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("create namespace: current namespace: %w", err)
	}
	defer orig.Close()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread() // unshare failed: the thread is unchanged
		return nil, fmt.Errorf("create namespace: unshare: %w", err)
	}
	defer func() {
		if serr := netns.Set(orig); serr != nil {
			err = errors.Join(err, fmt.Errorf("create namespace: return to the original namespace: %w (thread discarded)", serr))
			if f != nil {
				f.Close()
				f = nil
			}
			return // the thread stays locked: it exits with its goroutine
		}
		runtime.UnlockOSThread()
	}()
	f, err = os.Open(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()))
	if err != nil {
		return nil, fmt.Errorf("create namespace: %w", err)
	}
	return f, nil
}
