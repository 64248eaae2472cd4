package pager

import (
	"os"
	"path/filepath"
	"testing"
)

func TestExtentsMergeAndQuery(t *testing.T) {
	var e extents
	e = e.add(10, 20)
	e = e.add(30, 40)
	e = e.add(20, 25) // touches [10,20): merges
	e = e.add(5, 6)
	e = e.add(24, 31) // bridges into [30,40)
	want := extents{{5, 6}, {10, 40}}
	if len(e) != len(want) || e[0] != want[0] || e[1] != want[1] {
		t.Fatalf("extents = %v, want %v", e, want)
	}
	tests := []struct {
		lo, hi          uint64
		covers, overlap bool
	}{
		{10, 40, true, true},
		{12, 13, true, true},
		{6, 10, false, false},
		{4, 6, false, true},
		{39, 41, false, true},
		{40, 50, false, false},
		{0, 5, false, false},
	}
	for _, tt := range tests {
		if got := e.covers(tt.lo, tt.hi); got != tt.covers {
			t.Errorf("covers(%d,%d) = %v, want %v", tt.lo, tt.hi, got, tt.covers)
		}
		if got := e.overlaps(tt.lo, tt.hi); got != tt.overlap {
			t.Errorf("overlaps(%d,%d) = %v, want %v", tt.lo, tt.hi, got, tt.overlap)
		}
	}
}

func TestDataMapFindsHoles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sparse")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const mib = 1 << 20
	if err := f.Truncate(8 * mib); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, mib)
	buf[0] = 1
	for _, off := range []int64{0, 5 * mib} {
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	data, err := dataMap(f, 8*mib)
	if err != nil {
		t.Fatal(err)
	}
	// Filesystems may allocate in bigger blocks, but [1,5) MiB and [6,8) MiB
	// stay holes on every filesystem with SEEK_HOLE, and the written MiBs are data.
	if !data.covers(0, mib) || !data.covers(5*mib, 6*mib) {
		t.Errorf("data map %v misses written ranges", data)
	}
	if data.overlaps(2*mib, 4*mib) || data.overlaps(7*mib, 8*mib) {
		t.Errorf("data map %v reports data inside holes", data)
	}
}
