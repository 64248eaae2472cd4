package emulator

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"github.com/forkd/forkd/internal/capacity"
	"golang.org/x/sys/unix"
)

// pageSize is the guest page size: 4 KiB. The workload, the dirty log and
// a Diff snapshot count in it whatever backs guest memory, as KVM's dirty
// log does.
const pageSize = 4096

// hugePageSize is the host page backing guest memory with huge_pages 2M
// (hugetlbfs): every region is mapped, registered with a uffd and announced
// in the uffd handshake in whole pages of this size.
const hugePageSize = 2 << 20

// hugePages2M is machine-config's huge_pages value for hugetlbfs backing.
const hugePages2M = "2M"

// Firecracker's x86 layout: RAM below the MMIO hole at 3 GiB, the rest from
// 4 GiB on. A VM larger than 3 GiB therefore has two regions.
const (
	x86MMIOGapStart uint64 = 3 << 30
	x86HighRAMStart uint64 = 4 << 30
)

// region is one guest memory region as the vmstate records it and as the
// uffd handshake reports it. Regions are contiguous in the mem-file: Offset
// accumulates, the guest-physical gap is not in the file.
type region struct {
	GPA    uint64 `json:"gpa"`
	Size   uint64 `json:"size"`
	Offset uint64 `json:"offset"`
}

// layoutRegions splits memBytes of RAM at splitBytes (3 GiB on x86; smaller
// through forkd.split_mib so tests reach the multi-region paths).
func layoutRegions(memBytes, splitBytes uint64) []region {
	if splitBytes == 0 || splitBytes%pageSize != 0 || memBytes <= splitBytes {
		return []region{{GPA: 0, Size: memBytes, Offset: 0}}
	}
	return []region{
		{GPA: 0, Size: splitBytes, Offset: 0},
		{GPA: x86HighRAMStart, Size: memBytes - splitBytes, Offset: splitBytes},
	}
}

// guestMemory is guest RAM: one host mapping per region. Page i of the guest
// (in mem-file order) is at file offset i*pageSize.
type guestMemory struct {
	regions []region
	maps    [][]byte // maps[r] is the host mapping of regions[r]
	// fileBacked: the mapping is MAP_PRIVATE of a mem-file, so a discard must
	// map anonymous memory over the range (MADV_DONTNEED would re-read the
	// file), as Firecracker does for balloon discards.
	fileBacked bool
	// huge: the mapping is hugetlbfs (huge_pages 2M): 2 MiB host pages,
	// never file-backed, never discarded (a 4 KiB discard cannot free part
	// of a huge page; the config refuses a discarding workload).
	huge bool
	size uint64
}

// backingPageSize is the host page size of the mapping: the unit a uffd
// handler must install (UFFDIO_COPY of anything smaller into hugetlbfs
// fails with EINVAL).
func (m *guestMemory) backingPageSize() uint64 {
	if m.huge {
		return hugePageSize
	}
	return pageSize
}

func (m *guestMemory) pages() uint64 { return m.size / pageSize }

// page returns the 4 KiB of guest page i.
func (m *guestMemory) page(i uint64) []byte {
	off := i * pageSize
	for r, reg := range m.regions {
		if off >= reg.Offset && off < reg.Offset+reg.Size {
			o := off - reg.Offset
			return m.maps[r][o : o+pageSize : o+pageSize]
		}
	}
	panic(fmt.Sprintf("guest page %d outside guest RAM (%d pages)", i, m.pages()))
}

// discard frees guest page i the way a balloon does: its next read returns
// zeros. On anonymous (and uffd-registered) memory that is MADV_DONTNEED,
// which reaches a pager as UFFD_EVENT_REMOVE.
func (m *guestMemory) discard(i uint64) error {
	if m.huge {
		return fmt.Errorf("discard guest page %d: guest memory is 2 MiB hugetlbfs pages, a 4 KiB discard cannot free one", i)
	}
	p := m.page(i)
	if m.fileBacked {
		addr := unsafe.Pointer(&p[0])
		if _, err := unix.MmapPtr(-1, 0, addr, pageSize, unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED|unix.MAP_NORESERVE); err != nil {
			return fmt.Errorf("discard guest page %d: mmap anonymous over file: %w", i, err)
		}
		return nil
	}
	if err := unix.Madvise(p, unix.MADV_DONTNEED); err != nil {
		return fmt.Errorf("discard guest page %d: madvise DONTNEED: %w", i, err)
	}
	return nil
}

// hostAddr is the host virtual address of region r's mapping.
func (m *guestMemory) hostAddr(r int) uint64 {
	return uint64(uintptr(unsafe.Pointer(&m.maps[r][0])))
}

func (m *guestMemory) close() error {
	var first error
	for _, b := range m.maps {
		if err := unix.Munmap(b); err != nil && first == nil {
			first = fmt.Errorf("munmap guest memory: %w", err)
		}
	}
	m.maps = nil
	return first
}

func totalSize(regions []region) uint64 {
	var n uint64
	for _, r := range regions {
		n += r.Size
	}
	return n
}

// mapAnonymous maps fresh guest RAM with Firecracker's flags (boot, and a
// Uffd load): MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE, plus
// MAP_HUGETLB|MAP_HUGE_2MB with huge. NORESERVE on hugetlbfs means no page of
// the pool is reserved here: a fault the pool cannot serve is a SIGBUS (a
// uffd handler's UFFDIO_COPY fails with ENOMEM instead), hence
// claimHugePages at boot. Region sizes must be whole huge pages (the
// config and the vmstate check ensure it): munmap of a hugetlbfs mapping
// needs its length aligned.
func mapAnonymous(regions []region, huge bool) (*guestMemory, error) {
	m := &guestMemory{regions: regions, size: totalSize(regions), huge: huge}
	flags := unix.MAP_PRIVATE | unix.MAP_ANONYMOUS | unix.MAP_NORESERVE
	kind := "anonymous"
	if huge {
		flags |= unix.MAP_HUGETLB | unix.MAP_HUGE_2MB
		kind = "2 MiB hugetlbfs"
	}
	for _, r := range regions {
		if huge && r.Size%hugePageSize != 0 {
			m.close()
			return nil, fmt.Errorf("map %d bytes of %s guest memory: not a whole number of huge pages", r.Size, kind)
		}
		b, err := unix.Mmap(-1, 0, int(r.Size), unix.PROT_READ|unix.PROT_WRITE, flags)
		if err != nil {
			m.close()
			return nil, fmt.Errorf("map %d bytes of %s guest memory: %w", r.Size, kind, err)
		}
		m.maps = append(m.maps, b)
	}
	return m, nil
}

// claimHugePages takes every 2 MiB page of a freshly booted hugetlbfs guest
// from the host's pool (MADV_POPULATE_WRITE), so a pool too small for the
// guest fails InstanceStart with a message saying what to grow, where
// Firecracker, mapping with MAP_NORESERVE too, boots and takes a SIGBUS at
// the first fault the pool cannot serve. The pool's pages are allocated
// when the pool grows, so claiming them costs the host no memory; it does
// make every page resident (a mincore Diff without dirty tracking then
// counts all of them, as it would once the guest had touched its RAM).
// POPULATE_WRITE reports the fault it could not serve as EFAULT instead of
// raising the signal.
func (m *guestMemory) claimHugePages() error {
	if !m.huge {
		return nil
	}
	for r, b := range m.maps {
		if err := unix.Madvise(b, unix.MADV_POPULATE_WRITE); err != nil {
			need := m.size / hugePageSize
			if errors.Is(err, unix.EFAULT) || errors.Is(err, unix.ENOMEM) {
				return fmt.Errorf("guest memory (huge_pages 2M) needs %d free 2 MiB huge pages for its %d MiB and the host's pool ran out "+
					"(populate region %d: %v): raise nr_hugepages (%s) so that %d pages are free (or the VMM's hugetlb cgroup limit)",
					need, m.size>>20, r, err, capacity.NrHugePagesPath, need) // named, never read: a jailed VMM has no /sys
			}
			return fmt.Errorf("populate region %d of 2 MiB hugetlbfs guest memory: %w", r, err)
		}
	}
	return nil
}

// mapFile maps the mem-file MAP_PRIVATE|MAP_NORESERVE per region: clean pages
// are the file's page cache (shared by every VM mapping the same inode),
// written pages become private copies. The file must cover every region:
// mapping past EOF would SIGBUS at the first touch, so a short file is an
// error, as in Firecracker.
func mapFile(path string, regions []region) (*guestMemory, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open mem file: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat mem file %s: %w", path, err)
	}
	need := totalSize(regions)
	if uint64(st.Size()) < need {
		return nil, fmt.Errorf("mem file %s is %d bytes, shorter than guest memory (%d bytes)", path, st.Size(), need)
	}
	m := &guestMemory{regions: regions, size: need, fileBacked: true}
	for _, r := range regions {
		b, err := unix.Mmap(int(f.Fd()), int64(r.Offset), int(r.Size), unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_NORESERVE)
		if err != nil {
			m.close()
			return nil, fmt.Errorf("map mem file %s at offset %d: %w", path, r.Offset, err)
		}
		m.maps = append(m.maps, b)
	}
	return m, nil
}
