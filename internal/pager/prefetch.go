package pager

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"runtime/debug"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/uffd"
)

// Working-set recording and replay (internal/prefetch holds the file).
//
// Recording: a session created with record_pages logs the first fault of
// each page, in order, until it holds that many; the daemon fetches the log
// when its time budget ends (GET /sessions/{id}/recording) and stores it.
//
// Replay: a session created with prefetch_path installs the recorded pages
// in first-touch order, in contiguous runs, alongside demand faults. It
// installs them straight from a read-only shared mapping of the mem-file
// (one copy, page cache to guest, where a read into a buffer first made
// two; one mapping per file, which the sessions reading it share:
// memmap.go), or, where the file cannot be mapped, from buffers it reads.
// Its rules, on top of the event rules (serve.go):
//
//  1. Demand faults first. A run (at most runBytes) is installed only after
//     the events read so far are applied and their faults served, and the
//     loop reads events again after each run. Reading the mem-file happens
//     on another goroutine (the reader), never in front of a fault.
//  2. Never into a removed range. A page the guest discarded is skipped (its
//     own fault gets zeros, as always): a REMOVE read in a drain is applied
//     before the next run is installed, and a REMOVE the kernel has not
//     delivered yet makes the copy fail with EAGAIN (mmap_changing), after
//     which events are drained before the rest of the run is tried again.
//  3. Never over a page the guest has. Installed pages are skipped; a page
//     the guest got meanwhile fails the copy with EEXIST and is skipped.
//     UFFDIO_COPY never replaces a present page, so a guest write is never
//     undone.
//  4. Probes: one recorded page in probeStride is left to fault. Whether the
//     guest faults them is the only way to see whether it uses the
//     recording (an installed page is invisible once read), and gives the
//     waste estimate.
//  5. ESRCH ends the session as for a fault; any other error stops replay
//     only, never the VM.

// probeEvery: at most one recorded page in probeEvery is a probe. Each
// probe costs the guest a fault, which waits for the run being installed:
// one in 32 cost a 64 MiB replay ~500 faults and its guest ~40 ms here
// (BENCHMARKS.md); one in 128 still samples a working set of 4,096 pages
// or more with 32 probes or more.
const probeEvery = 128

// maxProbes bounds one replay's probes. The waste estimate's precision
// depends on how many pages it samples, not on the working set's size, so
// past maxProbes*probeEvery recorded pages the probes spread out rather
// than grow in number: the guest's cost of them stays flat (~64 faults)
// where one in 128 would cost a 1 GiB working set 2,048.
const maxProbes = 64

// probeStride is the distance between the probes of a recording of n
// pages: every probeStride-th recorded page, from the first, is one. That
// makes ceil(n/probeStride(n)) probes: never more than maxProbes, and 32
// or more for any n of 4,096 or more.
func probeStride(n int) int {
	return max(probeEvery, (n+maxProbes-1)/maxProbes)
}

// runBytes bounds one install (and one read): demand faults wait at most
// one run's copy.
const runBytes = 512 << 10

// getRunBuf returns a buffer of n bytes from the server's pool (contents
// undefined: fillRun writes every byte it installs). Every replay reads its
// whole working set through these, and 25 forks replaying 64 MiB each
// would otherwise give the garbage collector 1.6 GB to sweep.
func (s *Server) getRunBuf(n uint64) []byte {
	if n > runBytes {
		return make([]byte, n) // a huge page: not pooled
	}
	if b, ok := s.runBufs.Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, runBytes)
}

// putRunBuf recycles a buffer once no install reads it any more.
func (s *Server) putRunBuf(b []byte) {
	if cap(b) == runBytes {
		b = b[:runBytes]
		s.runBufs.Put(&b)
	}
}

// readAheadGap and readAheadMax shape the reads into the page cache a
// replaying session starts when it is created: recorded pages up to 16
// pages apart are read as one range of at most 8 MiB.
const (
	readAheadGap = 16
	readAheadMax = 2048
)

// prefetchCounters are one session's replay progress besides the counters.
type prefetchCounters struct {
	doneNs atomic.Int64 // ns from creation to the end of replay; 0 while running
	done   atomic.Bool
	err    atomic.Pointer[string]
}

// replayPages is the size of the recording being replayed (0 for none).
func (s *session) replayPages() int {
	if s.replay == nil {
		return 0
	}
	return len(s.replay.Pages)
}

// prefetchInfo is the session's prefetch stats (nil: neither records nor
// replays).
func (s *session) prefetchInfo() *SessionPrefetch {
	switch {
	case s.replay != nil:
		c := &s.stats
		p := &SessionPrefetch{Mode: "replay", PagesRecorded: uint64(len(s.replay.Pages)),
			PagesPrefetched: c.prefetched.Load(), Done: s.pf.done.Load()}
		if probes := c.probes.Load(); probes > 0 {
			unused := probes - min(c.probeFaults.Load(), probes)
			p.PagesWasted = p.PagesPrefetched * unused / probes
		}
		if ns := s.pf.doneNs.Load(); ns > 0 {
			p.WorkingSetMs = time.Duration(ns).Milliseconds()
		}
		if e := s.pf.err.Load(); e != nil {
			p.Error = *e
		}
		return p
	case s.replayErr != "":
		return &SessionPrefetch{Mode: "none", Error: s.replayErr}
	case s.recordMax > 0:
		s.recMu.Lock()
		defer s.recMu.Unlock()
		return &SessionPrefetch{Mode: "record", PagesRecorded: uint64(len(s.recPages))}
	}
	return nil
}

// logFault records the first fault of a page (a region page of ps bytes at
// file offset off) while the session records. It returns the log's length
// before the entry, for unlogFault, or -1 if it logged nothing.
func (s *session) logFault(off, ps uint64) int {
	if s.recordMax == 0 {
		return -1
	}
	s.recMu.Lock()
	defer s.recMu.Unlock()
	mark := len(s.recPages)
	for p := off / uffd.PageSize; p < (off+ps)/uffd.PageSize && len(s.recPages) < s.recordMax; p++ {
		s.recPages = append(s.recPages, p)
	}
	if len(s.recPages) == mark {
		return -1
	}
	return mark
}

// unlogFault takes back the entry logFault made at mark, for an install
// that did not happen (deferred). Only the session goroutine logs, so
// nothing was logged after it.
func (s *session) unlogFault(mark int) {
	s.recMu.Lock()
	s.recPages = s.recPages[:mark]
	s.recMu.Unlock()
}

// startRecording marks the start of the recording's window.
func (s *session) startRecording() {
	s.recMu.Lock()
	s.recStart = time.Now()
	s.recMu.Unlock()
}

// recording is the first-fault log as a working-set recording.
func (s *session) recording() (prefetch.Recording, error) {
	if s.recordMax == 0 {
		return prefetch.Recording{}, fmt.Errorf("session %s: %w: it was not created to record (record_pages)", s.id, errConflict)
	}
	s.recMu.Lock()
	defer s.recMu.Unlock()
	if s.recStart.IsZero() {
		return prefetch.Recording{}, fmt.Errorf("session %s: %w: no VMM has connected yet", s.id, errConflict)
	}
	return prefetch.Recording{
		Key: s.cacheKey, PageSize: uffd.PageSize, FileSize: s.backingSize, Source: prefetch.SourceUffd,
		Window: time.Since(s.recStart), RecordedAt: s.recStart, Pages: append([]uint64(nil), s.recPages...),
	}, nil
}

// in4K returns rec with its pages counted in 4 KiB mem-file pages, the
// unit replay plans in and stats report. The recordings forkd writes
// already are (a session of 2 MiB pages logs each fault as its 512 4 KiB
// pages), but a recording names its own page size, and its indices read
// as 4 KiB pages when they are not would replay other pages than the
// guest's. A page smaller than 4 KiB stands for the 4 KiB page holding
// it; each 4 KiB page is kept once, at its first mention.
func in4K(rec prefetch.Recording) prefetch.Recording {
	ps := uint64(rec.PageSize)
	if ps == uffd.PageSize || ps == 0 {
		return rec
	}
	seen := make(pageSet, (uint64(rec.FileSize)/uffd.PageSize+64)/64)
	var pages []uint64
	for _, p := range rec.Pages {
		lo, hi := p*ps/uffd.PageSize, ((p+1)*ps+uffd.PageSize-1)/uffd.PageSize
		for q := lo; q < hi; q++ {
			if !seen.any(q, q+1) {
				seen.add(q)
				pages = append(pages, q)
			}
		}
	}
	rec.PageSize, rec.Pages = uffd.PageSize, pages
	return rec
}

// readAhead reads the recording into the page cache in large ranges, so
// the reader (one run at a time) and the faults find it there: started at
// session creation, before the VMM has even connected. It stops with the
// session.
func (s *session) readAhead() {
	if s.replay == nil {
		return
	}
	// Sibling sessions of one key created together read it once: the
	// others wait for the first (and then find every run in the page
	// cache).
	srv := s.srv
	srv.mu.Lock()
	for {
		wait, busy := srv.populating[s.keyID]
		if !busy {
			break
		}
		srv.mu.Unlock()
		select {
		case <-wait:
		case <-s.ctx.Done():
			return
		}
		srv.mu.Lock()
	}
	done := make(chan struct{})
	srv.populating[s.keyID] = done
	srv.mu.Unlock()
	defer func() {
		srv.mu.Lock()
		delete(srv.populating, s.keyID)
		srv.mu.Unlock()
		close(done)
	}()
	if _, err := prefetch.Populate(s.ctx, s.backing, s.plan.readAhead); err != nil && s.ctx.Err() == nil {
		s.log.Warn("prefetch readahead", "err", err)
	}
}

// pfRun is a run of region pages to install.
type pfRun struct {
	region int
	addr   uint64 // first page's address in the VMM
	off    uint64 // its offset in the mem-file
	pages  int
	ps     uint64
	buf    []byte // data pages' bytes (zero pages left zero); set by the reader
	zero   []bool // per page: install as zeros
	// borrowed: buf is not a pooled buffer but a window of the replayer's
	// mapping of the mem-file or a cache entry (never recycled, never
	// written).
	borrowed bool
}

// replayer is the serve goroutine's side of replay.
type replayer struct {
	h *handler
	// mem is the session's read-only shared mapping of the mem-file
	// (memmap.go) that runs are installed from (nil: runs are read into
	// buffers). serve drops the session's reference to it once the reader
	// has returned and nothing installs any more.
	mem      []byte
	ready    chan *pfRun // filled by the reader, in plan order; closed at its end
	cur      *pfRun      // the run being installed
	pos      int         // next page of cur
	finished bool
	stalled  bool // the last install got EAGAIN with nothing done
}

// startReplay plans the recording over the regions, marks the probes and
// starts the reader. It returns nil when there is nothing to replay.
func (h *handler) startReplay(ctx context.Context) *replayer {
	s := h.s
	if s.replay == nil {
		return nil
	}
	// Probes: every probeStride-th region page of the recording, in
	// first-touch order. Region pages, not recorded (4 KiB) pages: a 2 MiB
	// region page holds 512 recorded pages, and one probe in probeStride of
	// those would make every 2 MiB page of a working set under 64 MiB a
	// probe, leaving replay nothing to install.
	h.probe = make([][]uint64, len(h.regions))
	seen := make([][]uint64, len(h.regions))
	for i := range h.regions {
		h.probe[i] = make([]uint64, len(h.installed[i]))
		seen[i] = make([]uint64, len(h.installed[i]))
	}
	// Each recorded page's region page, once: firstTouch calls fn for each
	// in first-touch order, with its first recorded 4 KiB mem-file page.
	firstTouch := func(fn func(ri int, idx, p uint64)) {
		for i := range seen {
			clear(seen[i])
		}
		for _, p := range s.replay.Pages {
			if ri, idx, ok := h.regionPageOf(p * uffd.PageSize); ok && seen[ri][idx/64]&(1<<(idx%64)) == 0 {
				seen[ri][idx/64] |= 1 << (idx % 64)
				fn(ri, idx, p)
			}
		}
	}
	touched := 0
	firstTouch(func(int, uint64, uint64) { touched++ })
	ps := h.regions[0].PageSize // every region's (the handshake's rule)
	r := &replayer{h: h, ready: make(chan *pfRun, 4)}
	r.mem = h.mapping()
	// What the reader puts in the pager's cache, by 4 KiB mem-file page:
	// the probes (they will fault) and no others, since a copy of every
	// page in fresh heap is what made a cold replay slow. The exception is
	// a replay that reads its runs into buffers (2 MiB pages, or a mem-file
	// that cannot be mapped) with a sibling of its key live: it caches
	// every page (keep nil), so the siblings' replays and faults find the
	// working set in the pager's cache, not one read of it each. A 4 KiB
	// replay from the mapping needs no such copy: every replay of the key
	// installs straight from the kernel's page cache (fillRun), which is
	// what a sibling's copy out of the pager's cache into a buffer cost
	// again, plus a cache lookup per page.
	keep := make(pageSet, (uint64(s.backingSize)/uffd.PageSize+63)/64)
	if (ps != uffd.PageSize || r.mem == nil) && s.srv.liveSiblings(s) > 0 {
		keep = nil
	}
	probes, i, stride := uint64(0), 0, probeStride(touched)
	firstTouch(func(ri int, idx, p uint64) {
		if i%stride == 0 {
			h.probe[ri][idx/64] |= 1 << (idx % 64)
			probes++
			if keep != nil {
				keep.add(p)
			}
		}
		i++
	})
	s.count(func(c *counters) { c.probes.Add(probes) })
	// Plan in the regions' pages (replayRuns), once per recording.
	runs := h.planRuns(s.plan.replayRuns(ps), ps)
	go s.readRuns(ctx, runs, keep, r.mem, r.ready)
	return r
}

// pageSet is a set of 4 KiB mem-file pages, one bit each.
type pageSet []uint64

func (set pageSet) add(p uint64) {
	if p/64 < uint64(len(set)) {
		set[p/64] |= 1 << (p % 64)
	}
}

// any reports whether a page of [lo, hi) is in the set.
func (set pageSet) any(lo, hi uint64) bool {
	for p := lo; p < hi && p/64 < uint64(len(set)); p++ {
		if set[p/64]&(1<<(p%64)) != 0 {
			return true
		}
	}
	return false
}

// regionPageOf maps a mem-file offset to its region and page index there.
func (h *handler) regionPageOf(off uint64) (region int, idx uint64, ok bool) {
	for i, r := range h.regions {
		if off >= r.Offset && off-r.Offset < r.Size {
			return i, (off - r.Offset) / r.PageSize, true
		}
	}
	return 0, 0, false
}

// planRuns turns runs of mem-file pages of unit bytes (the regions' page
// size, or 4 KiB) into runs of region pages, clipped to the regions, at
// most runBytes each (one page at least).
func (h *handler) planRuns(runs []prefetch.Run, unit uint64) []*pfRun {
	var out []*pfRun
	for _, run := range runs {
		lo, hi := run.Page*unit, run.End()*unit
		for ri, r := range h.regions {
			a, b := max(lo, r.Offset), min(hi, r.Offset+r.Size)
			if a >= b {
				continue
			}
			ps := r.PageSize
			a, b = a&^(ps-1), (b+ps-1)&^(ps-1)
			per := max(1, runBytes/ps)
			for off := a; off < b; off += per * ps {
				n := min(per, (b-off)/ps)
				out = append(out, &pfRun{region: ri, addr: r.BaseHostVirtAddr + (off - r.Offset), off: off, pages: int(n), ps: ps})
			}
		}
	}
	return out
}

// readRuns is the reader: it fills each run from the page cache of the
// pager or the mem-file (one read per run when anything is missing) and
// hands it to the serve goroutine in order, waking it. It stops at the
// end of the plan, at the first read error, or when ctx ends. keep are
// the pages it puts in the pager's cache (fillRun).
func (s *session) readRuns(ctx context.Context, runs []*pfRun, keep pageSet, mem []byte, ready chan<- *pfRun) {
	defer func() {
		close(ready)
		s.kick() // the serve loop sees the end without waiting for a fault
	}()
	if hold := s.srv.cfg.holdPrefetch; hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return
		}
	}
	for _, run := range runs {
		if err := s.fillRun(run, keep, mem); err != nil {
			s.pf.setErr(err)
			s.log.Warn("prefetch stopped", "err", err)
			return
		}
		select {
		case ready <- run:
			s.kick()
		case <-ctx.Done():
			return
		}
	}
}

// fillRun reads one run's pages: holes and all-zero pages are zeros, the
// rest data, from the pager's cache when it has every page, else with one
// pread of the run (which the readahead has mostly made a page-cache
// copy). Of what it read it caches the all-zero markers and the pages in
// keep (every page when keep is nil): for a lone VM of its key, only the
// probes, which the guest will fault. Once installed, a replayed page is
// never asked of the pager by this VM again, and a 4 KiB copy of every
// page, in fresh heap, is what made a lone cold replay slower than a warm
// one (BENCHMARKS.md); siblings live beside it share the copies instead.
func (s *session) fillRun(run *pfRun, keep pageSet, mem []byte) error {
	ps := run.ps
	run.zero = make([]bool, run.pages)
	if n := uint64(run.pages) * ps; ps == uffd.PageSize && mem != nil && run.off+n <= uint64(len(mem)) {
		// 4 KiB pages come from the mapping whatever the pager's cache
		// holds: a lookup per page and a copy of each into a buffer cost a
		// sibling's replay more than the install itself (BENCHMARKS.md).
		for i := range run.pages {
			off := run.off + uint64(i)*ps
			run.zero[i] = !s.data.overlaps(off, off+ps)
		}
		return s.fillRunMapped(run, keep, mem[run.off:run.off+n:run.off+n], nil)
	}
	cached := make([][]byte, run.pages)
	missing := false
	for i := range run.pages {
		off := run.off + uint64(i)*ps
		if !s.data.overlaps(off, off+ps) {
			run.zero[i] = true
			continue
		}
		data, zero, ok := s.srv.cache.get(s.pageKey(off, ps))
		switch {
		case ok && zero:
			run.zero[i] = true
		case ok:
			cached[i] = data
		default:
			missing = true
		}
	}
	if n := uint64(run.pages) * ps; missing && mem != nil && run.off+n <= uint64(len(mem)) {
		return s.fillRunMapped(run, keep, mem[run.off:run.off+n:run.off+n], cached)
	}
	if !missing && run.pages == 1 && cached[0] != nil {
		// One cached page (a 2 MiB page, most often): installed straight
		// from its immutable cache entry. A copy into a buffer of its own
		// gave every sibling's replay a fresh 2 MiB allocation and copy
		// per page (buffers of 2 MiB are not pooled).
		run.buf, run.borrowed = cached[0], true
		return nil
	}
	run.buf = s.srv.getRunBuf(uint64(run.pages) * ps)
	if !missing {
		for i, d := range cached {
			copy(run.buf[uint64(i)*ps:], d)
		}
		return nil
	}
	t0 := time.Now()
	n, err := s.backing.ReadAt(run.buf, int64(run.off))
	d := time.Since(t0)
	s.count(func(c *counters) {
		c.backingBytes.Add(uint64(n))
		c.backingNanos.Add(uint64(d))
	})
	if n != len(run.buf) {
		return fmt.Errorf("read %s at %d: %d of %d bytes: %w", s.backingPath, run.off, n, len(run.buf), err)
	}
	s.cacheRead(run, keep, cached)
	return nil
}

// cacheRead marks the all-zero pages of run.buf that fillRun found neither
// zero nor cached (cached nil: it looked none up), and puts them, and the
// pages in keep, in the pager's cache (keep nil: every page).
func (s *session) cacheRead(run *pfRun, keep pageSet, cached [][]byte) {
	ps := run.ps
	for i := range run.pages {
		if run.zero[i] || cached != nil && cached[i] != nil {
			continue
		}
		pg := run.buf[uint64(i)*ps : uint64(i+1)*ps]
		off := run.off + uint64(i)*ps
		k := s.pageKey(off, ps)
		switch {
		case allZero(pg):
			run.zero[i] = true
			s.srv.cache.put(k, nil, true)
		case keep == nil || keep.any(off/uffd.PageSize, (off+ps)/uffd.PageSize):
			s.srv.cache.put(k, append([]byte(nil), pg...), false)
		}
	}
}

// fillRunMapped is fillRun's read of a run whose pages are not all in the
// pager's cache, from the mapping of the mem-file: the run is installed
// straight from w, its window (which the kernel fills from the page cache,
// or the disk, in one call first); of the pages fillRun found neither zero
// nor cached, the all-zero ones and those in keep are cached as fillRun
// caches them.
func (s *session) fillRunMapped(run *pfRun, keep pageSet, w []byte, cached [][]byte) error {
	run.buf, run.borrowed = w, true
	t0 := time.Now()
	if err := populateRead(w, &s.srv.cfg); err != nil {
		return fmt.Errorf("read %s at %d: %w", s.backingPath, run.off, err)
	}
	err := readMapped(func() { s.cacheRead(run, keep, cached) })
	if err != nil {
		return fmt.Errorf("read %s at %d: %w", s.backingPath, run.off, err)
	}
	d := time.Since(t0)
	s.count(func(c *counters) {
		c.backingBytes.Add(uint64(len(w)))
		c.backingNanos.Add(uint64(d))
	})
	return nil
}

// readMapped runs read, which reads a mapping of a file, and turns a fault
// in it into an error. A mem-file never shrinks while a VM uses it (it is
// sealed); if one did, a read past its new end would fault (SIGBUS), and
// that must stop one replay, not the pager and every VM it serves.
func readMapped(read func()) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if p := recover(); p != nil {
			fault, ok := p.(interface{ Addr() uintptr }) // what SetPanicOnFault panics with
			if !ok {
				panic(p) // not a fault: a bug, not this file's doing
			}
			err = fmt.Errorf("the mapped file faulted at %#x (did it shrink?): %v", fault.Addr(), p)
		}
	}()
	read()
	return nil
}

func (p *prefetchCounters) setErr(err error) {
	msg := err.Error()
	p.err.Store(&msg)
}

// more reports whether replay has work it can do without waiting.
func (r *replayer) more() bool {
	return r != nil && !r.finished && (r.cur != nil || len(r.ready) > 0)
}

// prefetchStep installs (the rest of) one run, after the caller has served
// the faults read so far.
func (h *handler) prefetchStep() error {
	r := h.pf
	if r == nil || r.finished {
		return nil
	}
	if !r.next() {
		return nil // the reader is behind: faults and events meanwhile
	}
	r.stalled = false
	run := r.cur
	for r.pos < run.pages {
		i := r.pos
		if !h.installable(run, i) {
			r.pos++
			continue
		}
		j := i + 1
		for j < run.pages && h.installable(run, j) && run.zero[j] == run.zero[i] && (!run.zero[i] || run.ps == uffd.PageSize) {
			j++
		}
		done, err := h.installRun(run, i, j)
		h.markInstalled(run, i, i+done)
		if done > 0 {
			// In 4 KiB pages, as the recording counts (PagesRecorded).
			h.s.count(func(c *counters) { c.prefetched.Add(uint64(done) * (run.ps / uffd.PageSize)) })
		}
		switch {
		case err == nil:
			r.pos = j
		case errors.Is(err, unix.EEXIST):
			// The page at i+done is present: the guest faulted it first.
			h.markInstalled(run, i+done, i+done+1)
			h.s.count(func(c *counters) { c.copyError(unix.EEXIST) })
			r.pos = i + done + 1
		case errors.Is(err, unix.EAGAIN) && done > 0:
			r.pos = i + done // partly done: the next page tells why
		case errors.Is(err, unix.EAGAIN):
			// A non-cooperative event (REMOVE) is pending: drain events,
			// then try the rest of this run again.
			h.s.count(func(c *counters) { c.copyError(unix.EAGAIN) })
			r.stalled = true
			return nil
		case errors.Is(err, unix.ESRCH):
			h.s.count(func(c *counters) { c.copyError(unix.ESRCH) })
			return errVMMGone
		default:
			var errno unix.Errno
			if errors.As(err, &errno) {
				h.s.count(func(c *counters) { c.copyError(errno) })
			}
			err = fmt.Errorf("prefetch install at %#x (file offset %d): %w", run.addr+uint64(i)*run.ps, run.off+uint64(i)*run.ps, err)
			h.s.pf.setErr(err)
			h.s.log.Warn("prefetch stopped; faults are still served", "err", err)
			h.finishReplay()
			return nil
		}
	}
	if !run.borrowed {
		h.s.srv.putRunBuf(run.buf)
	}
	r.cur = nil
	// Take the next run now (installed after the next drain), so a reader
	// that has finished is seen here: its last wake-up may have been spent
	// on the wait this run ended.
	r.next()
	return nil
}

// next makes the next ready run current, if there is none; it finishes
// replay when the reader has closed the queue. It reports whether there is
// a current run.
func (r *replayer) next() bool {
	if r.cur != nil {
		return true
	}
	select {
	case run, ok := <-r.ready:
		if !ok {
			r.h.finishReplay()
			return false
		}
		r.cur, r.pos = run, 0
		return true
	default:
		return false
	}
}

// installable: not a probe, not installed, not removed (rule 2).
func (h *handler) installable(run *pfRun, i int) bool {
	idx := (run.addr-h.regions[run.region].BaseHostVirtAddr)/run.ps + uint64(i)
	if h.probe[run.region][idx/64]&(1<<(idx%64)) != 0 || h.isInstalled(run.region, idx) {
		return false
	}
	page := run.addr + uint64(i)*run.ps
	return h.s.srv.cfg.prefetchIgnoresRemoves || !h.removed.overlaps(page, page+run.ps)
}

// installRun installs pages [i, j) of run, all data or all zeros, in one
// ioctl, and returns how many pages it installed.
func (h *handler) installRun(run *pfRun, i, j int) (int, error) {
	dst := run.addr + uint64(i)*run.ps
	length := uint64(j-i) * run.ps
	var n int64
	var err error
	switch {
	case run.zero[i] && run.ps == uffd.PageSize:
		n, err = h.f.ZeroPage(dst, length, 0)
	case run.zero[i]:
		// hugetlbfs has no ZEROPAGE: copy a zero huge page (one at a time).
		z := h.s.srv.zeroHugePage()
		n, err = h.f.Copy(uintptr(dst), uintptr(unsafe.Pointer(&z[0])), length, 0)
		runtime.KeepAlive(z)
	default:
		// run.buf is this run's own buffer, untouched until the copy returns.
		src := run.buf[uint64(i)*run.ps:]
		n, err = h.f.Copy(uintptr(dst), uintptr(unsafe.Pointer(&src[0])), length, 0)
		runtime.KeepAlive(src)
	}
	return int(uint64(n) / run.ps), err
}

func (h *handler) markInstalled(run *pfRun, i, j int) {
	base := (run.addr - h.regions[run.region].BaseHostVirtAddr) / run.ps
	for k := i; k < j; k++ {
		idx := base + uint64(k)
		h.installed[run.region][idx/64] |= 1 << (idx % 64)
	}
}

// finishReplay ends replay: nothing more to install.
func (h *handler) finishReplay() {
	r := h.pf
	if r.finished {
		return
	}
	r.finished, r.cur = true, nil
	s := h.s
	s.pf.doneNs.Store(int64(max(time.Since(s.created), 1)))
	s.pf.done.Store(true)
	s.log.Info("prefetch installed the working set", "pages", s.stats.prefetched.Load(),
		"probes", s.stats.probes.Load(), "working_set", time.Since(s.created))
}

// noteFault counts a demand fault of a probe page (once per probe).
func (h *handler) noteFault(ri int, page uint64) {
	if h.probe == nil {
		return
	}
	idx := (page - h.regions[ri].BaseHostVirtAddr) / h.regions[ri].PageSize
	if h.probe[ri][idx/64]&(1<<(idx%64)) != 0 {
		h.probe[ri][idx/64] &^= 1 << (idx % 64)
		h.s.count(func(c *counters) { c.probeFaults.Add(1) })
	}
}
