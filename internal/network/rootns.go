package network

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrRootNamespace is New's refusal to network VMs from the host's initial
// network namespace without Config.RootNamespace.
var ErrRootNamespace = errors.New("the daemon runs in the host's own (initial) network namespace")

// A VM network adds links, addresses, routes, sysctls and nftables rules
// to the daemon's namespace. In the host's initial namespace those land on
// the machine's own network, which is what a production daemon is for and
// what nothing else may do: a test daemon, a demo or a stray `forkd serve`
// started there by mistake would otherwise fill the host with veths and
// routes from the default pool. So New refuses that namespace unless the
// configuration says this daemon is the host's (network_root_namespace),
// and tests run their daemons inside namespaces of their own.

// nsID identifies a namespace: the device and inode of its nsfs file.
type nsID struct{ dev, ino uint64 }

func nsIDOf(fd int) (nsID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nsID{}, err
	}
	return nsID{uint64(st.Dev), st.Ino}, nil
}

func nsIDAt(path string) (nsID, bool) {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return nsID{}, false
	}
	return nsID{uint64(st.Dev), st.Ino}, true
}

// initNetIno is the fixed inode number recent kernels (6.18 has it) give
// the initial network namespace (NET_NS_INIT_INO in <linux/nsfs.h>). Older
// kernels number every network namespace from 0xF0000000 up, so no other
// namespace can have it.
const initNetIno = 0xEFFFFFF9

// isInitialNamespace reports whether id is the host's initial network
// namespace: by its fixed inode where the kernel has one, else by being
// the namespace of init (pid 1) or of kthreadd (pid 2, when this process
// sees the host's pids: kernel threads never leave the initial namespace).
// In a container with its own network namespace, pid 1 is the container's
// init, so the container's namespace counts as its host's: a daemon there
// networks the container's network, and needs RootNamespace too.
func isInitialNamespace(id nsID) bool {
	if id.ino == initNetIno {
		return true
	}
	if p, ok := nsIDAt("/proc/1/ns/net"); ok && p == id {
		return true
	}
	if comm, err := os.ReadFile("/proc/2/comm"); err == nil && bytes.Equal(comm, []byte("kthreadd\n")) {
		if p, ok := nsIDAt("/proc/2/ns/net"); ok && p == id {
			return true
		}
	}
	return false
}

// InInitialNamespace reports whether the calling goroutine's OS thread is
// in the host's initial network namespace (see isInitialNamespace).
func InInitialNamespace() (bool, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	ns, err := netns.Get()
	if err != nil {
		return false, err
	}
	defer ns.Close()
	id, err := nsIDOf(int(ns))
	if err != nil {
		return false, err
	}
	return isInitialNamespace(id), nil
}

// rootNamespaceError is New's refusal, with what to do about it.
func rootNamespaceError() error {
	return fmt.Errorf("network: %w and network_root_namespace is off: VMs get no network here, "+
		"so nothing is added to the host's own links, routes and rules. On a host meant to network VMs, "+
		"set network_root_namespace: true (--network-root-namespace); tests and demos run their daemon "+
		"in a network namespace of their own", ErrRootNamespace)
}

// checkDaemonNS fails if the Host's handle on the daemon's namespace no
// longer names the namespace New opened (a descriptor closed and reused):
// a VM's host veth is moved into whatever namespace that descriptor names,
// so a stale one could put it anywhere, the host's own namespace included.
func (h *Host) checkDaemonNS() error {
	id, err := nsIDOf(int(h.daemon))
	if err != nil || id != h.daemonID {
		return fmt.Errorf("network: the handle on the daemon's namespace is no longer valid (%v): refusing to make links through it", err)
	}
	return nil
}

// hostNFT is an nftables connection in the daemon's namespace.
func (h *Host) hostNFT() (*nftables.Conn, error) {
	if err := h.checkDaemonNS(); err != nil {
		return nil, err
	}
	nc, err := nftables.New(nftables.WithNetNSFd(int(h.daemon)))
	if err != nil {
		return nil, fmt.Errorf("network: nftables: %w", err)
	}
	return nc, nil
}

// inDaemonNS runs fn on a thread in the daemon's namespace (see doIn).
func (h *Host) inDaemonNS(fn func() error) error {
	if err := h.checkDaemonNS(); err != nil {
		return err
	}
	return doIn(h.daemon, fn)
}
