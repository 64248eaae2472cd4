package network

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// SetTAPOwner gives slot's TAP to uid and gid (TUNSETOWNER, TUNSETGROUP),
// so that a VMM running as them, without CAP_NET_ADMIN (a jailed one), may
// attach to it; without an owner only a privileged process may. The owner
// is a property of the persistent device: call it before each launch, while
// no VMM holds the TAP, since a VM's uid is its running VMM's.
func (h *Host) SetTAPOwner(slot, uid, gid int) error {
	err := Do(h.cfg.NamespacePath(slot), func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		ifr, err := unix.NewIfreq(TapName)
		if err != nil {
			return err
		}
		// Attach as a VMM would (the flags must match the device's type);
		// closing detaches again, and the persistent TAP stays.
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			return fmt.Errorf("attach: %w", err)
		}
		if err := unix.IoctlSetInt(fd, unix.TUNSETOWNER, uid); err != nil {
			return fmt.Errorf("TUNSETOWNER %d: %w", uid, err)
		}
		if err := unix.IoctlSetInt(fd, unix.TUNSETGROUP, gid); err != nil {
			return fmt.Errorf("TUNSETGROUP %d: %w", gid, err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("network %s: give %s to uid %d: %w", h.cfg.Namespace(slot), TapName, uid, err)
	}
	return nil
}
