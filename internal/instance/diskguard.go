package instance

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/hostpath"
)

// The disk guard: a VMM writes its disk in place, so no VMM may open a disk
// inode another name shares. Forks link the disk of a source on Standby or
// of a store snapshot (a fork to Standby writes no disk byte until it
// runs), so a disk is shared until one of its VMs is launched; every launch
// (start, restore: both go through launch) first gives the VM a private
// copy if its disk has more than one link, the same clone-then-rename the
// unshare guard makes of a mem-file (memfile.EnsureExclusiveAt). The other
// links keep the old inode and its bytes. Adopting a running VMM opens
// nothing: that VMM was launched through the guard.
//
// Sealing is the second line: a shared disk is sealed (root-owned, 0444),
// so a jailed VMM could not open it for writing, and giveToVMM refuses an
// inode with more than one link; an unjailed VMM (root) could.

// unshareDisk is the disk guard, run by launch before the VMM is started:
// no VMM of this instance lives, so nothing else writes its guest dir. It
// makes the disk a private inode (nlink 1) and, for an unjailed VMM,
// root's and writable (0600; a jailed one gets it through giveToVMM).
func (m *Manager) unshareDisk(id string, g guestdir.Guest) error {
	dir, err := hostpath.OpenDirBeneath("guest dir", g.Jail, g.Dir)
	if err != nil {
		return fmt.Errorf("disk guard: %w", err)
	}
	defer dir.Close()
	name := filepath.Base(g.Rootfs())
	if !m.cfg.DisableDiskGuard {
		unshared, err := m.files.EnsureExclusiveAt(dir, name)
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENOENT) {
			return nil // no disk (a VM booted without one): nothing to guard
		}
		if err != nil {
			return fmt.Errorf("disk guard: %w", err)
		}
		if unshared {
			m.log.Info("disk unshared before launch", "instance", id, "path", g.Rootfs())
		}
	}
	if m.jail != nil {
		return nil
	}
	fd, err := unix.Openat(int(dir.Fd()), name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("disk guard: %s: %w", g.Rootfs(), err)
	}
	f := os.NewFile(uintptr(fd), g.Rootfs())
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("disk guard: %s: %w", g.Rootfs(), err)
	}
	if st.Nlink > 1 || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil // the guard is off (its twin test): leave the shared inode's seal alone
	}
	if err := f.Chown(0, 0); err != nil {
		return fmt.Errorf("disk guard: %w", err)
	}
	return f.Chmod(0o600)
}

// sealDisk seals instance g's disk once no VMM may write it (standby,
// after its VMM is killed; the reconciler, for a Standby VM), so forks may
// link it. A missing disk is not an error.
func sealDisk(g guestdir.Guest) error {
	f, err := hostpath.OpenBeneath("disk", g.Jail, g.Rootfs())
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fmt.Errorf("seal %s: %w", g.Rootfs(), err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fmt.Errorf("seal %s: not a regular file", g.Rootfs())
	}
	if sealed(&st) {
		return nil
	}
	return sealFile(f)
}

// diskUnshareCost is what the disk guard's private copy of the disk at
// rootfs will take at the next launch: nothing unless another name shares
// it, and then a copy only where the filesystem cannot reflink.
func (m *Manager) diskUnshareCost(rootfs string) int64 {
	var st syscall.Stat_t
	if err := syscall.Stat(rootfs, &st); err != nil || st.Nlink <= 1 {
		return 0
	}
	return m.copyCost(rootfs)
}

// diskShareCost is what a fork's disk taken from rootfs costs at the fork:
// nothing when it is linked (sealed: the copy, if any, is the launch's),
// else its copy.
func (m *Manager) diskShareCost(rootfs string) int64 {
	var st unix.Stat_t
	if err := unix.Stat(rootfs, &st); err == nil && sealed(&st) {
		return 0
	}
	return m.copyCost(rootfs)
}
