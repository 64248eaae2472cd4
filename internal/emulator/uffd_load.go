package emulator

import (
	"fmt"
	"net"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/uffd"
)

// mapUffd is the Uffd backend of /snapshot/load, step by step as Firecracker
// (persist.rs guest_memory_from_uffd): anonymous guest memory with the boot
// flags; a uffd (O_CLOEXEC|O_NONBLOCK, never user-mode-only: a real VMM's
// faults come from KVM in kernel mode) with UFFD_FEATURE_EVENT_REMOVE; a
// MISSING registration per region; then one sendmsg to the handler at
// backendPath carrying the region list and the uffd. Nothing touches guest
// memory before the handshake. The VMM keeps its own uffd. Per release:
//   - from 1.12, EVENT_REMOVE always, the regions carry page_size, and the
//     handshake socket stays open for the VMM's life (so its close cannot
//     race the payload, and its EOF tells the handler the VMM exited);
//   - before 1.12, EVENT_REMOVE only with a balloon device (here: a workload
//     that discards pages, forkd.discard_pct > 0, the emulator's balloon),
//     only page_size_kib (holding bytes), and the socket is closed right
//     after the handshake.
func (v *vmm) mapUffd(backendPath string, regions []region, balloon bool) (*guestMemory, error) {
	mem, err := mapAnonymous(regions)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*guestMemory, error) {
		mem.close()
		return nil, err
	}
	fd, err := uffd.Open(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		return fail(fmt.Errorf("create userfaultfd: %w", err))
	}
	var features uint64
	if v.rel.uffdAlwaysEventRemove() || balloon {
		features = uffd.FeatureEventRemove
	}
	if err := fd.API(features); err != nil {
		fd.Close()
		return fail(fmt.Errorf("userfaultfd API (features %#x): %w", features, err))
	}
	hs := make([]uffd.Region, len(regions))
	for i, r := range regions {
		addr := mem.hostAddr(i)
		if _, err := fd.Register(addr, r.Size, uffd.RegisterModeMissing); err != nil {
			fd.Close()
			return fail(fmt.Errorf("register region %d (%d bytes) with userfaultfd: %w", i, r.Size, err))
		}
		hs[i] = uffd.Region{BaseHostVirtAddr: addr, Size: r.Size, Offset: r.Offset, PageSizeKiB: pageSize}
		if v.rel.uffdPageSize() {
			hs[i].PageSize = pageSize
		}
	}
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: backendPath, Net: "unix"})
	if err != nil {
		fd.Close()
		return fail(fmt.Errorf("connect to the uffd handler at %s: %w", backendPath, err))
	}
	if err := uffd.SendHandshake(conn, hs, fd.Fd()); err != nil {
		conn.Close()
		fd.Close()
		return fail(fmt.Errorf("send the uffd handshake to %s: %w", backendPath, err))
	}
	if !v.rel.uffdKeepsSocket() {
		conn.Close()
		conn = nil
	}
	v.uffd, v.uffdConn = fd, conn
	return mem, nil
}
