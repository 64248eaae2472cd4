package emulator

import (
	"math/bits"
	"sync/atomic"
)

// dirtyBitmap is the emulator's stand-in for KVM's dirty log: one bit per
// guest page the guest wrote since the last snapshot. vCPUs set bits
// concurrently (atomic OR); the VMM reads and clears it only while every vCPU
// is stopped (snapshots require Paused).
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

func (d *dirtyBitmap) reset() {
	for i := range d.words {
		d.words[i].Store(0)
	}
}
