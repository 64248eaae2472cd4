package network

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// nsDir holds named network namespaces, as `ip netns` keeps them: each is
// an empty file with the namespace bind-mounted on it, so it lives without
// any process in it and `ip netns exec` can enter it for debugging.
const nsDir = "/var/run/netns"

// nsfsMagic is the filesystem magic of a namespace file (NSFS_MAGIC).
const nsfsMagic = 0x6e736673

// isNamespace reports whether path is a mounted namespace (not merely the
// empty file a crash between create and mount leaves).
func isNamespace(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == nsfsMagic
}

// inNewNamespace creates a network namespace, mounts it at path and runs fn
// on a locked OS thread inside it, then returns the thread to the namespace
// it was in. If that fails the thread stays locked and dies with the
// goroutine, never going back to the pool inside a foreign namespace. On
// error nothing stays mounted at path.
func inNewNamespace(path string, fn func(ns netns.NsHandle) error) (err error) {
	if err := os.MkdirAll(nsDir, 0o755); err != nil {
		return fmt.Errorf("create namespace %s: %w", path, err)
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("create namespace %s: current namespace: %w", path, err)
	}
	defer orig.Close()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread() // unshare failed: the thread is unchanged
		return fmt.Errorf("create namespace %s: unshare: %w", path, err)
	}
	defer func() {
		if serr := netns.Set(orig); serr != nil {
			err = errors.Join(err, fmt.Errorf("namespace %s: return to the original namespace: %w (thread discarded)", path, serr))
			return // the thread stays locked: it exits with this goroutine
		}
		runtime.UnlockOSThread()
	}()
	mounted := false
	defer func() {
		if err != nil {
			if mounted {
				unix.Unmount(path, unix.MNT_DETACH)
			}
			os.Remove(path)
		}
	}()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return fmt.Errorf("create namespace %s: %w", path, err)
	}
	f.Close()
	self := fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
	if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("create namespace %s: bind mount: %w", path, err)
	}
	mounted = true
	ns, err := netns.Get()
	if err != nil {
		return fmt.Errorf("namespace %s: %w", path, err)
	}
	defer ns.Close()
	return fn(ns)
}

// inNamespace runs fn on a locked OS thread inside the namespace mounted at
// path (see Do).
func inNamespace(path string, fn func(ns netns.NsHandle) error) error {
	return Do(path, func() error {
		ns, err := netns.Get()
		if err != nil {
			return err
		}
		defer ns.Close()
		return fn(ns)
	})
}

// removeNamespace unmounts and removes a named namespace. The namespace
// itself, and the links in it, go when the last process in it exits. A
// namespace that is not there is not an error.
func removeNamespace(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove namespace %s: unmount: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove namespace %s: %w", path, err)
	}
	return nil
}

// namespaceSlots lists the slots of this tag's named namespaces (mounted or
// a bare file a crash left).
func (c Config) namespaceSlots() (map[int]bool, error) {
	ents, err := os.ReadDir(nsDir)
	if errors.Is(err, os.ErrNotExist) {
		return map[int]bool{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list namespaces: %w", err)
	}
	out := map[int]bool{}
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), c.nsPrefix()) {
			continue
		}
		if s, ok := slotOfName(e.Name(), c.nsPrefix()); ok {
			out[s] = true
		}
	}
	return out, nil
}

// NewNamespace creates a named network namespace (under /var/run/netns)
// with its loopback up, for a daemon to run in: the demo runs its daemon in
// one so nothing it does touches the host's network. RemoveNamespace
// removes it.
func NewNamespace(name string) (string, error) {
	path := nsDir + "/" + name
	err := inNewNamespace(path, func(netns.NsHandle) error {
		nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return err
		}
		defer nl.Close()
		return nl.LinkSetUp(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: 1}})
	})
	if err != nil {
		return "", err
	}
	return path, nil
}

// RemoveNamespace removes a namespace NewNamespace made.
func RemoveNamespace(path string) error { return removeNamespace(path) }
