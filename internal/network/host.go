package network

import (
	"fmt"
	"os"
	"runtime"
	"sync"
	"unsafe"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Host makes and removes the network of every VM of one daemon, in the
// daemon's own network namespace (which may itself be a container's or a
// test's). It is safe for concurrent use: each VM's objects carry its slot,
// and the host-wide table is changed under mu.
type Host struct {
	cfg Config
	// daemon is the daemon's network namespace, opened once: every OS
	// thread not locked inside a VM's namespace is in it.
	daemon netns.NsHandle
	// daemonID identifies that namespace, so a handle that stopped naming
	// it (closed and reused) is caught before a link is moved through it.
	daemonID nsID
	// nl is a netlink (route) handle in the daemon's namespace.
	nl *netlink.Handle
	// ctl is a datagram socket in the daemon's namespace, for link ioctls.
	ctl int

	mu sync.Mutex // guards the host table (Init, publishes)

	closeOnce sync.Once
}

// New opens a Host for cfg in the calling thread's network namespace (the
// daemon's). It changes nothing on the host. It refuses the host's initial
// network namespace (ErrRootNamespace) unless cfg.RootNamespace is set.
func New(cfg Config) (*Host, error) { return newHost(cfg, isInitialNamespace) }

// newHost is New with the test of the initial namespace given (tests make a
// namespace of their own count as the host's).
func newHost(cfg Config, initial func(nsID) bool) (*Host, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	daemon, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("network: the daemon's namespace: %w", err)
	}
	id, err := nsIDOf(int(daemon))
	if err != nil {
		daemon.Close()
		return nil, fmt.Errorf("network: the daemon's namespace: %w", err)
	}
	if initial(id) && !cfg.RootNamespace {
		daemon.Close()
		return nil, rootNamespaceError()
	}
	nl, err := netlink.NewHandleAt(daemon, unix.NETLINK_ROUTE)
	if err != nil {
		daemon.Close()
		return nil, fmt.Errorf("network: netlink: %w", err)
	}
	ctl, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0) // on this thread: the daemon's namespace
	if err != nil {
		nl.Close()
		daemon.Close()
		return nil, fmt.Errorf("network: control socket: %w", err)
	}
	return &Host{cfg: cfg, daemon: daemon, daemonID: id, nl: nl, ctl: ctl}, nil
}

// Close releases the Host's handles. Namespaces, links and rules stay: VMs
// outlive the daemon.
func (h *Host) Close() error {
	var err error
	h.closeOnce.Do(func() {
		h.nl.Close()
		unix.Close(h.ctl)
		err = h.daemon.Close()
	})
	return err
}

// Config is the configuration the Host was made with.
func (h *Host) Config() Config { return h.cfg }

// Check reports whether a host can run networked VMs: /dev/net/tun, a
// network namespace and nf_tables. It changes nothing. The error says what
// is missing.
func Check() error {
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("network: /dev/net/tun: %w (load the tun module; containers need the device passed in)", err)
	}
	f.Close()
	return nil
}

// writeSysctl sets a sysctl of the calling thread's network namespace
// (/proc/sys/net is per namespace, resolved from the thread that opens it).
func writeSysctl(name, value string) error {
	path := "/proc/sys/" + name
	if b, err := os.ReadFile(path); err == nil && string(b) == value+"\n" {
		return nil
	}
	if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", name, value, err)
	}
	return nil
}

// syncCarrier asks the kernel for a link's carrier (ethtool's GLINK). Since
// Linux 6.8 that query first runs any link event still pending for the
// device, so on return a link whose carrier just came on has its transmit
// queue started: the first packet through it is not dropped. (Older kernels
// answer without syncing; their pending event runs within milliseconds.)
func (h *Host) syncCarrier(name string) error {
	const ethtoolGLINK = 0x0000000a
	val := [2]uint32{ethtoolGLINK, 0}
	var ifr [40]byte
	copy(ifr[:unix.IFNAMSIZ-1], name)
	*(*uintptr)(unsafe.Pointer(&ifr[unix.IFNAMSIZ])) = uintptr(unsafe.Pointer(&val))
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(h.ctl), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr)))
	runtime.KeepAlive(&val)
	if errno != 0 {
		return fmt.Errorf("%s: link state: %w", name, errno)
	}
	if val[1] == 0 {
		return fmt.Errorf("%s: no carrier after both ends came up", name)
	}
	return nil
}
