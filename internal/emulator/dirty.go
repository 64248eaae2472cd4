package emulator

import (
	"fmt"
	"math/bits"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// dirtyBitmap is the emulator's stand-in for KVM's dirty log: one bit per
// guest page the guest wrote since the log was last taken (a Diff snapshot
// takes it, a Full clears it). vCPUs set bits concurrently (atomic OR); the
// VMM reads and clears it only while every vCPU is stopped (snapshots
// require Paused).
type dirtyBitmap struct {
	words []atomic.Uint64
}

func newDirtyBitmap(pages uint64) *dirtyBitmap {
	return &dirtyBitmap{words: make([]atomic.Uint64, (pages+63)/64)}
}

func (d *dirtyBitmap) mark(page uint64) {
	d.words[page/64].Or(1 << (page % 64))
}

func (d *dirtyBitmap) isDirty(page uint64) bool {
	return d.words[page/64].Load()&(1<<(page%64)) != 0
}

func (d *dirtyBitmap) count() uint64 {
	var n uint64
	for i := range d.words {
		n += uint64(bits.OnesCount64(d.words[i].Load()))
	}
	return n
}

// take returns the log and clears it, as KVM_GET_DIRTY_LOG does.
func (d *dirtyBitmap) take() *dirtyBitmap {
	out := &dirtyBitmap{words: make([]atomic.Uint64, len(d.words))}
	for i := range d.words {
		out.words[i].Store(d.words[i].Swap(0))
	}
	return out
}

func (d *dirtyBitmap) reset() {
	for i := range d.words {
		d.words[i].Store(0)
	}
}

// residentPages is the dirty log Firecracker (1.13+) makes up for a Diff
// snapshot of a VM without dirty tracking: every page mincore(2) reports in
// core. It over-approximates (a page read but never written counts, and on
// a file mapping so does a clean page cache page) but never misses a write,
// as long as the host does not swap.
func residentPages(mem *guestMemory) (*dirtyBitmap, error) {
	d := newDirtyBitmap(mem.pages())
	for r, reg := range mem.regions {
		vec := make([]byte, reg.Size/pageSize)
		m := mem.maps[r]
		// x/sys has no Linux wrapper for mincore(2).
		if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)),
			uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
			return nil, fmt.Errorf("mincore of region %d: %w", r, errno)
		}
		first := reg.Offset / pageSize
		for i, b := range vec {
			if b&1 != 0 {
				d.mark(first + uint64(i))
			}
		}
	}
	return d, nil
}
