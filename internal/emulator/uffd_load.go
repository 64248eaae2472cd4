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
//
// With huge (the snapshot's huge_pages 2M) the memory is hugetlbfs
// (mapAnonymous), registered MISSING all the same, and every region
// announces 2 MiB pages (page_size and page_size_kib both 2097152): the
// handler must install whole huge pages (UFFDIO_COPY of 4 KiB fails with
// EINVAL there, and hugetlbfs has no UFFDIO_ZEROPAGE). Region bases are
// 2 MiB aligned (the kernel aligns a hugetlbfs mapping). Nothing is
// claimed from the pool here: a pool the handler's copies exhaust fails
// them with ENOMEM.
func (v *vmm) mapUffd(backendPath string, regions []region, balloon, huge bool) (*guestMemory, error) {
	mem, err := mapAnonymous(regions, huge)
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
		ps := mem.backingPageSize()
		hs[i] = uffd.Region{BaseHostVirtAddr: addr, Size: r.Size, Offset: r.Offset, PageSizeKiB: ps}
		if v.rel.uffdPageSize() {
			hs[i].PageSize = ps
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
