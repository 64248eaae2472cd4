package network_test

import (
	"errors"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/network"
)

// attachAs attaches to slot's TAP the way a jailed VMM does, with the
// effective uid and gid of an unprivileged process (on one thread, which
// then dies: it never goes back to the pool with changed credentials).
func attachAs(t *testing.T, h *network.Host, slot, uid int) error {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		errc <- network.Do(h.Config().NamespacePath(slot), func() error {
			runtime.LockOSThread() // never unlocked: the thread ends with this goroutine
			fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			// Per-thread credentials, raw: euid/egid uid, no capabilities.
			if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, ^uintptr(0), uintptr(uid), ^uintptr(0)); e != 0 {
				return e
			}
			if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), uintptr(uid), ^uintptr(0)); e != 0 {
				return e
			}
			ifr, err := unix.NewIfreq(network.TapName)
			if err != nil {
				return err
			}
			ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
			attach := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
			// Root again (the saved uid allows it), so Do can take the
			// thread back to its namespace.
			unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), 0, ^uintptr(0))
			unix.RawSyscall(unix.SYS_SETRESGID, ^uintptr(0), 0, ^uintptr(0))
			return attach
		})
	}()
	return <-errc
}

func TestATAPGivenToAUIDIsAttachableByItAlone(t *testing.T) {
	h, _ := testHost(t, false)
	if err := h.Ensure(0); err != nil {
		t.Fatal(err)
	}
	// The twin first: without an owner, an unprivileged VMM cannot attach.
	if err := attachAs(t, h, 0, 64500); !errors.Is(err, unix.EPERM) {
		t.Fatalf("unowned TAP: attach as uid 64500 = %v, want EPERM", err)
	}
	if err := h.SetTAPOwner(0, 64500, 64500); err != nil {
		t.Fatal(err)
	}
	if err := attachAs(t, h, 0, 64500); err != nil {
		t.Errorf("TAP given to 64500: attach as 64500 = %v, want success", err)
	}
	if err := attachAs(t, h, 0, 64501); !errors.Is(err, unix.EPERM) {
		t.Errorf("TAP given to 64500: attach as 64501 = %v, want EPERM", err)
	}
	// A later VMM of the same VM may run as another uid.
	if err := h.SetTAPOwner(0, 64501, 64501); err != nil {
		t.Fatal(err)
	}
	if err := attachAs(t, h, 0, 64501); err != nil {
		t.Errorf("TAP given to 64501: attach as 64501 = %v", err)
	}
}
