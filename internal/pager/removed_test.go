package pager

import (
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/uffd"
)

// TestAFaultReportedTwiceInADiscardedRangeCountsOnce: the kernel reports a
// fault again when a signal interrupts the faulting thread (the Go
// runtime's preemption does), so a handler can see one guest access as two
// events; the second finds the page mapped (EEXIST). removed_faults counts
// the zero pages installed, not the events. The twin is counting the event
// before the install, which counted 3 for 2 discarded pages once in CI.
func TestAFaultReportedTwiceInADiscardedRangeCountsOnce(t *testing.T) {
	requireUffd(t)
	f, err := uffd.Open(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.API(0); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(-1, 0, 2*uffd.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	base := uint64(uintptr(unsafe.Pointer(&mem[0])))
	if _, err := f.Register(base, uint64(len(mem)), uffd.RegisterModeMissing); err != nil {
		t.Fatal(err)
	}
	s := &session{srv: &Server{}}
	h := &handler{s: s, f: f,
		regions:   []uffd.Region{{BaseHostVirtAddr: base, Size: uint64(len(mem)), PageSize: uffd.PageSize}},
		installed: [][]uint64{make([]uint64, 1)}}
	h.applyRemove(base, base+uffd.PageSize)
	for i := range 2 {
		if res, err := h.install(base, 0, false, pageData{}); err != nil || res != installed {
			t.Fatalf("install %d of the discarded page: %v, %v; want installed (EEXIST is success)", i, res, err)
		}
	}
	if got := s.stats.removedFaults.Load(); got != 1 {
		t.Errorf("removed_faults = %d after one discarded page served (its fault reported twice), want 1", got)
	}
	if got := s.stats.snapshot().CopyErrors; got["EEXIST"] != 1 {
		t.Errorf("copy errors %v, want the second report's one EEXIST", got)
	}
	if mem[0] != 0 {
		t.Errorf("the discarded page reads %#x, want zeros", mem[0])
	}
}
