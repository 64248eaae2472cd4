package prefetch

import (
	"cmp"
	"slices"
)

// Run is a contiguous range of pages of the mem-file.
type Run struct {
	Page  uint64 // first page index
	Pages uint64 // how many
}

// End is the page index just past the run.
func (r Run) End() uint64 { return r.Page + r.Pages }

// Plan merges recorded pages (page indices, first touch first) into
// contiguous runs for replay:
//
//   - pages at most gap pages apart join one run, which then covers the
//     pages between them too (gap 0: exactly the recorded pages; readahead
//     uses a small gap because one large read beats many small ones);
//   - a run holds at most maxPages pages (0: no limit), so an install or a
//     read is bounded and demand faults are looked at between runs;
//   - runs come in the order of the first touch of any page in them: the
//     first pages the guest needed come first, and where the working set is
//     dense they come in runs instead of one page at a time.
func Plan(pages []uint64, gap, maxPages uint64) []Run {
	if len(pages) == 0 {
		return nil
	}
	byPage := sortedByPage(pages)
	type ordered struct {
		run   Run
		first int // earliest position in pages of any page in the run
	}
	var runs []ordered
	cur := ordered{run: Run{Page: byPage[0].page, Pages: 1}, first: byPage[0].first}
	for _, e := range byPage[1:] {
		p := e.page
		last := cur.run.End() - 1
		if p == last {
			continue // a duplicate, touched first at an earlier position
		}
		if p-last <= gap+1 && (maxPages == 0 || p-cur.run.Page+1 <= maxPages) {
			cur.run.Pages = p - cur.run.Page + 1
			cur.first = min(cur.first, e.first)
			continue
		}
		runs = append(runs, cur)
		cur = ordered{run: Run{Page: p, Pages: 1}, first: e.first}
	}
	runs = append(runs, cur)
	// Positions are distinct, so no two runs have the same first touch.
	slices.SortFunc(runs, func(a, b ordered) int { return a.first - b.first })
	out := make([]Run, len(runs))
	for i, r := range runs {
		out[i] = r.run
	}
	return out
}

// entry is a recorded page and its position in the recording.
type entry struct {
	page  uint64
	first int
}

// sortedByPage returns each recorded page with its position, by page and,
// for a page recorded more than once (a 2 MiB page's 4 KiB pages, planned
// in 2 MiB units), its first position first: a run's first touch is then
// its first entry's. A page and its position are packed into one integer
// where both fit, which sorts several times faster than pairs.
func sortedByPage(pages []uint64) []entry {
	const posBits = 24
	out := make([]entry, len(pages))
	if len(pages) < 1<<posBits && slices.Max(pages) < 1<<(64-posBits) {
		keys := make([]uint64, len(pages))
		for i, p := range pages {
			keys[i] = p<<posBits | uint64(i)
		}
		slices.Sort(keys)
		for i, k := range keys {
			out[i] = entry{k >> posBits, int(k & (1<<posBits - 1))}
		}
		return out
	}
	for i, p := range pages {
		out[i] = entry{p, i}
	}
	slices.SortFunc(out, func(a, b entry) int { return cmp.Or(cmp.Compare(a.page, b.page), a.first-b.first) })
	return out
}

// TotalPages is the number of pages the runs cover.
func TotalPages(runs []Run) uint64 {
	var n uint64
	for _, r := range runs {
		n += r.Pages
	}
	return n
}
