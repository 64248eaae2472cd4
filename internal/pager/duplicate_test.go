package pager

import (
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/uffd"
)

// The kernel reports a fault again when a signal interrupts the faulting
// thread (the Go runtime's preemption does), so a handler can read one
// guest access as two events. These tests serve a real uffd in-process,
// over anonymous memory the test owns, and hand the handler the same
// event twice.

// dupHandler is a handler of a session whose mem-file is one hole (every
// page installs as zeros) over two 4 KiB pages registered with a uffd.
func dupHandler(t *testing.T) (*handler, []byte) {
	t.Helper()
	requireUffd(t)
	f, err := uffd.Open(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.API(0); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(-1, 0, 2*uffd.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	base := uint64(uintptr(unsafe.Pointer(&mem[0])))
	if _, err := f.Register(base, uint64(len(mem)), uffd.RegisterModeMissing); err != nil {
		t.Fatal(err)
	}
	return &handler{s: &session{srv: &Server{}}, f: f,
		regions:   []uffd.Region{{BaseHostVirtAddr: base, Size: uint64(len(mem)), PageSize: uffd.PageSize}},
		installed: [][]uint64{make([]uint64, 1)}}, mem
}

// serveReported serves flt's event as reported three times: twice in one
// batch, then again in the next.
func serveReported(t *testing.T, h *handler, flt fault) {
	t.Helper()
	for _, batch := range [][]fault{{flt, flt}, {flt}} {
		h.faults = batch
		if err := h.serveBatch(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestAFaultReportedAgainIsServedOnce: the second report of a page
// installed since finds it in, and neither reads nor installs it again
// (for a lone 2 MiB VM that would be a second 2 MiB read through the
// mapping, and a second miss). Twin, by hand: without reportedAgain the
// hole page counts 3 zero pages and 2 EEXISTs.
func TestAFaultReportedAgainIsServedOnce(t *testing.T) {
	h, mem := dupHandler(t)
	flt := fault{page: h.regions[0].BaseHostVirtAddr, read: time.Now()}
	serveReported(t, h, flt)
	st := h.s.stats.snapshot()
	if st.ZeroPages != 1 || len(st.CopyErrors) != 0 {
		t.Errorf("a fault reported 3 times installed %d zero pages, copy errors %v; want 1 and none", st.ZeroPages, st.CopyErrors)
	}
	if mem[0] != 0 {
		t.Errorf("the page reads %#x, want zeros", mem[0])
	}
}

// TestAFaultReportedAgainInADiscardedRangeCountsOnce: in a discarded range
// every fault installs zeros, so a report again does reach the install
// and gets EEXIST; removed_faults counts the zero pages installed, not the
// events. Twin, by hand: counting at the event counted 3 for 2 discarded
// pages once in CI.
func TestAFaultReportedAgainInADiscardedRangeCountsOnce(t *testing.T) {
	h, mem := dupHandler(t)
	base := h.regions[0].BaseHostVirtAddr
	h.applyRemove(base, base+uffd.PageSize)
	serveReported(t, h, fault{page: base, read: time.Now()})
	st := h.s.stats.snapshot()
	if st.RemovedFaults != 1 || st.CopyErrors["EEXIST"] != 2 {
		t.Errorf("removed_faults = %d, copy errors %v after one discarded page served (its fault reported 3 times); want 1 and the later reports' 2 EEXISTs", st.RemovedFaults, st.CopyErrors)
	}
	if mem[0] != 0 {
		t.Errorf("the discarded page reads %#x, want zeros", mem[0])
	}
}
