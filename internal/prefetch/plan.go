package prefetch

import (
	"slices"
	"sort"
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
	byPage := make([]int, len(pages)) // indices into pages, sorted by page
	for i := range byPage {
		byPage[i] = i
	}
	sort.Slice(byPage, func(a, b int) bool { return pages[byPage[a]] < pages[byPage[b]] })
	type ordered struct {
		run   Run
		first int // earliest position in pages of any page in the run
	}
	var runs []ordered
	cur := ordered{run: Run{Page: pages[byPage[0]], Pages: 1}, first: byPage[0]}
	for _, i := range byPage[1:] {
		p := pages[i]
		last := cur.run.End() - 1
		if p == last {
			continue // a duplicate: already covered
		}
		if p-last <= gap+1 && (maxPages == 0 || p-cur.run.Page+1 <= maxPages) {
			cur.run.Pages = p - cur.run.Page + 1
			cur.first = min(cur.first, i)
			continue
		}
		runs = append(runs, cur)
		cur = ordered{run: Run{Page: p, Pages: 1}, first: i}
	}
	runs = append(runs, cur)
	slices.SortStableFunc(runs, func(a, b ordered) int { return a.first - b.first })
	out := make([]Run, len(runs))
	for i, r := range runs {
		out[i] = r.run
	}
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
