package prefetch

import (
	"math/rand/v2"
	"slices"
	"testing"
)

func TestPlanMergesRunsInFirstTouchOrder(t *testing.T) {
	tests := []struct {
		name          string
		pages         []uint64
		gap, maxPages uint64
		want          []Run
	}{
		{"nothing", nil, 0, 0, nil},
		{"one contiguous run from scattered touches", []uint64{3, 1, 2, 0}, 0, 0, []Run{{0, 4}}},
		{"two runs, the later-touched one last", []uint64{10, 11, 0, 1, 12}, 0, 0, []Run{{10, 3}, {0, 2}}},
		{"a run is ordered by its earliest page", []uint64{20, 5, 6, 4}, 0, 0, []Run{{20, 1}, {4, 3}}},
		{"no gap joins only neighbours", []uint64{0, 2, 4}, 0, 0, []Run{{0, 1}, {2, 1}, {4, 1}}},
		{"a gap of 1 fills the holes", []uint64{0, 2, 4}, 1, 0, []Run{{0, 5}}},
		{"a gap too small leaves them apart", []uint64{0, 3}, 1, 0, []Run{{0, 1}, {3, 1}}},
		{"max pages splits a long run", []uint64{0, 1, 2, 3, 4, 5, 6}, 0, 3, []Run{{0, 3}, {3, 3}, {6, 1}}},
		{"split pieces keep their own order", []uint64{6, 0, 1, 2, 3, 4, 5}, 0, 3, []Run{{6, 1}, {0, 3}, {3, 3}}},
		{"duplicates are covered once", []uint64{1, 1, 2}, 0, 0, []Run{{1, 2}}},
		{"a page recorded twice is ordered by its first touch", []uint64{5, 9, 5}, 0, 0, []Run{{5, 1}, {9, 1}}},
		// Pages too large to pack with their position take the other sort.
		{"pages past 2^40, recorded twice, by first touch", []uint64{1<<41 + 5, 1<<41 + 9, 1<<41 + 5, 1<<41 + 6}, 0, 0, []Run{{1<<41 + 5, 2}, {1<<41 + 9, 1}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Plan(tt.pages, tt.gap, tt.maxPages)
			if !slices.Equal(got, tt.want) {
				t.Fatalf("Plan(%v, gap %d, max %d) = %v, want %v", tt.pages, tt.gap, tt.maxPages, got, tt.want)
			}
		})
	}
}

// TestPlanCoversEveryRecordedPageOnce: whatever the order and limits, the
// runs without a gap hold exactly the recorded pages.
func TestPlanCoversEveryRecordedPageOnce(t *testing.T) {
	var pages []uint64
	for i := range uint64(5000) {
		pages = append(pages, (i*7919)%20011)
	}
	for _, maxPages := range []uint64{0, 1, 7, 64, 256} {
		runs := Plan(pages, 0, maxPages)
		var got []uint64
		for _, r := range runs {
			if maxPages > 0 && r.Pages > maxPages {
				t.Fatalf("max %d: run %v is longer", maxPages, r)
			}
			for p := r.Page; p < r.End(); p++ {
				got = append(got, p)
			}
		}
		slices.Sort(got)
		want := slices.Clone(pages)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Fatalf("max %d: runs cover %d pages, want the %d recorded ones exactly", maxPages, len(got), len(want))
		}
		if TotalPages(runs) != uint64(len(pages)) {
			t.Fatalf("max %d: TotalPages = %d, want %d", maxPages, TotalPages(runs), len(pages))
		}
	}
}

// TestPlanOrdersRunsByFirstTouchWithManyDuplicates: a recording planned
// in 2 MiB units names each unit 512 times, interleaved with the others.
// Each unit's run must come in the order of the unit's first touch, which
// an unstable sort of the duplicates got wrong on inputs this large.
func TestPlanOrdersRunsByFirstTouchWithManyDuplicates(t *testing.T) {
	const units = 33
	var pages []uint64
	for i := range 512 * units {
		// Unit k is first touched at position k; later touches cycle
		// through the units in another order.
		switch {
		case i < units:
			pages = append(pages, uint64(2*i)) // even units: never contiguous
		default:
			pages = append(pages, uint64(2*((i*7)%units)))
		}
	}
	got := Plan(pages, 0, 1)
	if len(got) != units {
		t.Fatalf("Plan made %d runs, want %d", len(got), units)
	}
	for k, r := range got {
		if want := (Run{Page: uint64(2 * k), Pages: 1}); r != want {
			t.Fatalf("run %d = %v, want %v (first touch order)", k, r, want)
		}
	}
}

// BenchmarkPlan plans a recording as a replay does at 4 KiB (16,384
// pages of a 64 MiB working set, touched at random) and at 2 MiB (the same
// pages in 2 MiB units), and as the readahead does (gap 16, 8 MiB runs).
func BenchmarkPlan(b *testing.B) {
	const n = 16384
	pages := make([]uint64, n)
	for i := range pages {
		pages[i] = uint64(i)
	}
	rand.New(rand.NewPCG(1, 2)).Shuffle(n, func(i, j int) { pages[i], pages[j] = pages[j], pages[i] })
	units := make([]uint64, n)
	for i, p := range pages {
		units[i] = p / 512
	}
	for _, bc := range []struct {
		name          string
		pages         []uint64
		gap, maxPages uint64
	}{
		{"replay 4KiB", pages, 0, 128},
		{"replay 2MiB", units, 0, 1},
		{"readahead", pages, 16, 2048},
	} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				Plan(bc.pages, bc.gap, bc.maxPages)
			}
		})
	}
}
