package network

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// Do runs fn with the calling goroutine's OS thread inside the network
// namespace at nsPath (a bind mount such as /var/run/netns/NAME, or
// /proc/PID/ns/net). Sockets, links and processes fn creates belong to that
// namespace.
//
// A namespace is a property of an OS thread, not of a goroutine: Do locks
// the thread for the duration and switches it back before unlocking. If it
// cannot switch back, it leaves the thread locked, so the runtime destroys
// that thread when the goroutine ends instead of returning it to the pool
// inside a foreign namespace.
func Do(nsPath string, fn func() error) (err error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns %s: current namespace: %w", nsPath, err)
	}
	defer orig.Close()
	target, err := netns.GetFromPath(nsPath)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns %s: open: %w", nsPath, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns %s: enter: %w", nsPath, err)
	}
	defer func() {
		if rerr := netns.Set(orig); rerr != nil {
			// Leave the thread locked: it dies with this goroutine.
			err = fmt.Errorf("netns %s: return to the original namespace: %w (thread discarded)", nsPath, rerr)
			return
		}
		runtime.UnlockOSThread()
	}()
	return fn()
}

// doIn runs fn on a locked OS thread inside the namespace ns (an open
// handle), with Do's guarantee about the thread.
func doIn(ns netns.NsHandle, fn func() error) (err error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns: current namespace: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns: enter: %w", err)
	}
	defer func() {
		if rerr := netns.Set(orig); rerr != nil {
			err = fmt.Errorf("netns: return to the original namespace: %w (thread discarded)", rerr)
			return
		}
		runtime.UnlockOSThread()
	}()
	return fn()
}
