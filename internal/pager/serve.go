package pager

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/uffd"
)

// fault is a page fault waiting to be served.
type fault struct {
	page   uint64 // page-aligned address in the VMM
	region int
	read   time.Time // when its event was read: latency starts here
	pd     pageData  // the page, once read off the session goroutine (coldread.go)
	mapped bool      // its cold read goes through the mapping (mapped.go)
}

// handler serves one session's uffd. It is owned by the serve loop (one
// goroutine), so its fields need no lock.
type handler struct {
	s       *session
	f       *uffd.FD
	regions []uffd.Region
	// removed holds the ranges the VMM discarded (UFFD_EVENT_REMOVE). They
	// read as zeros from then on: serving file data there would resurrect
	// bytes the guest freed.
	removed extents
	// installed has one bit per page of each region: set once the page is
	// in the VMM (populate skips those).
	installed [][]uint64
	// deferred are faults whose install got EAGAIN, keyed by page so a
	// fault read twice is retried once.
	deferred map[uint64]fault
	order    []uint64 // deferred keys in arrival order
	faults   []fault  // scratch for one drain

	populating bool
	populated  bool // every page is in and the regions are unregistered
	popRegion  int
	popPage    uint64
	popStalled bool // the last populate step hit EAGAIN

	// pf replays a working-set recording (nil: none); probe has one bit per
	// page of each region for the recorded pages left for the guest to
	// fault (prefetch.go).
	pf    *replayer
	probe [][]uint64

	// Cold reads (coldread.go): reading holds the faults parked for a
	// read, keyed by page; reads carries them to the readers and readDone
	// brings them back. All nil with the syncColdReads hook.
	reading  map[uint64]fault
	reads    chan fault
	readDone chan coldRead
	readers  sync.WaitGroup
	// noWait is the mem-file's descriptor for RWF_NOWAIT reads (nil when
	// the filesystem refuses them).
	noWait syscall.RawConn

	// fmap is the session's reference to its mem-file's shared mapping
	// (memmap.go), taken by mapping() when replay or faults first need it
	// and dropped when serve returns, after every reader has stopped.
	fmap      *fileMap
	mapFailed bool // the mem-file could not be mapped: reads go into buffers
	// faultMem is the mapping that a lone session's 2 MiB faults are
	// served from (mapped.go; nil for 4 KiB pages). Set before the cold
	// readers start, which read it too. resident tells which pages the
	// page cache holds.
	faultMem []byte
	resident *prefetch.Residency
}

// installResult is what happened to one install.
type installResult int

const (
	installed      installResult = iota
	installAgain                 // EAGAIN: retry after reading pending events
	installSkipped               // populate left a zero page to the kernel
)

// serve runs the event loop until ctx ends or a fatal error. The rules
// (docs/architecture.md §8): read events until EAGAIN; apply every REMOVE of a batch
// before serving the batch's faults; EEXIST is success; EAGAIN defers the
// fault (deduplicated) until the events are drained; ESRCH ends the session.
// Replay of a working set follows its own rules on top (prefetch.go):
// demand faults first, never into a removed range, never over a present
// page.
func (s *session) serve(ctx context.Context, f *uffd.FD, regions []uffd.Region) error {
	h := &handler{s: s, f: f, regions: regions, deferred: make(map[uint64]fault)}
	for _, r := range regions {
		pages := r.Size / r.PageSize
		h.installed = append(h.installed, make([]uint64, (pages+63)/64))
	}
	if ps := regions[0].PageSize; s.srv.cache.budget > 0 && int64(ps)+entryOverhead > s.srv.cache.budget {
		// Each of the cache's shards holds 1/cacheShards of its budget, and
		// a page larger than that is never cached.
		s.log.Warn("the pager's cache is too small to hold this VM's pages: every fault reads the mem-file",
			"page_size", ps, "cache_budget_bytes", s.srv.cache.budget*cacheShards, "want_at_least", (int64(ps)+entryOverhead)*cacheShards)
	}
	if s.recordMax > 0 {
		s.startRecording()
	}
	if rc, err := s.backing.SyscallConn(); err == nil && !s.srv.cfg.parkEveryMiss {
		h.noWait = rc
	}
	h.mapFaults()
	readCtx, stopReader := context.WithCancel(ctx)
	h.pf = h.startReplay(readCtx)
	h.startColdReaders(readCtx)
	defer func() {
		stopReader()
		if h.pf != nil {
			for range h.pf.ready { // the reader closes it when it returns
			}
		}
		h.stopColdReaders()
		h.unmapFaults()
		h.releaseMapping() // no run, fault, reader or install refers to it any more
	}()
	msgs := make([]uffd.Msg, 64)
	idle := 0
	for {
		if ctx.Err() != nil {
			return nil
		}
		events, err := h.drain(msgs)
		if err != nil {
			return err
		}
		if err := h.serveBatch(); err != nil {
			return err
		}
		// Prefetch only after the batch's faults: demand faults first.
		if err := h.prefetchStep(); err != nil {
			return err
		}
		if err := h.populateStep(); err != nil {
			return err
		}
		if len(h.deferred) > 0 || h.populating || h.pf.more() || len(h.readDone) > 0 {
			// More work without waiting. A deferred fault that keeps getting
			// EAGAIN with no event to read means the kernel is mid-change:
			// yield instead of spinning hot.
			if events == 0 && (len(h.deferred) > 0 || h.popStalled || (h.pf != nil && h.pf.stalled)) {
				idle++
				if idle > 8 {
					time.Sleep(50 * time.Microsecond)
				} else {
					runtime.Gosched()
				}
			}
			continue
		}
		idle = 0
		if err := s.wait(ctx, f); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
}

// wait blocks until the uffd is readable, ctx ends, or kick is called.
func (s *session) wait(ctx context.Context, f *uffd.FD) error {
	waitCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.mu.Lock()
	if s.pendingKick || len(s.populate) > 0 {
		s.pendingKick = false
		s.mu.Unlock()
		return nil
	}
	s.waitCancel = cancel
	s.mu.Unlock()
	err := f.WaitReadable(waitCtx)
	s.mu.Lock()
	s.waitCancel = nil
	s.pendingKick = false
	s.mu.Unlock()
	if err != nil && ctx.Err() == nil && waitCtx.Err() != nil {
		return nil // kicked
	}
	return err
}

// drain reads every pending event: faults are queued in h.faults, REMOVEs
// applied at once. It returns how many events it read.
func (h *handler) drain(msgs []uffd.Msg) (int, error) {
	h.faults = h.faults[:0]
	total := 0
	for {
		n, err := h.f.ReadMsgs(msgs)
		if errors.Is(err, unix.EAGAIN) {
			return total, nil
		}
		if err != nil {
			return total, fmt.Errorf("read uffd events: %w", err)
		}
		now := time.Now()
		total += n
		for _, m := range msgs[:n] {
			switch m.Event {
			case uffd.EventPagefault:
				ri := h.regionOf(m.Address)
				if ri < 0 {
					return total, fmt.Errorf("fault at %#x outside every region", m.Address)
				}
				ps := h.regions[ri].PageSize
				h.faults = append(h.faults, fault{page: m.Address &^ (ps - 1), region: ri, read: now})
				h.s.count(func(c *counters) { c.faults.Add(1) })
			case uffd.EventRemove, uffd.EventUnmap:
				if !h.s.srv.cfg.ignoreRemoves {
					h.applyRemove(m.Start, m.End)
				}
				h.s.count(func(c *counters) { c.removes.Add(1) })
			default:
				return total, fmt.Errorf("unexpected uffd event %s (only PAGEFAULT and REMOVE are requested by Firecracker)", m)
			}
		}
	}
}

// applyRemove remembers that the VMM discarded [start, end). With 2 MiB
// pages that is the whole pages inside the range: the kernel frees whole
// huge pages only (it rounds a discard's end down, and a discard of less
// than a page frees nothing), so the rest of the range keeps the guest's
// bytes, or gets the mem-file's at its first fault. Zeros there would
// lose bytes the guest never gave up. Every region has one page size (the
// handshake's rule).
func (h *handler) applyRemove(start, end uint64) {
	if ps := h.regions[0].PageSize; ps > uffd.PageSize {
		start, end = (start+ps-1)&^(ps-1), end&^(ps-1)
	}
	if start < end {
		h.removed = h.removed.add(start, end)
	}
}

func (h *handler) regionOf(addr uint64) int {
	for i, r := range h.regions {
		if addr >= r.BaseHostVirtAddr && addr-r.BaseHostVirtAddr < r.Size {
			return i
		}
	}
	return -1
}

// serveBatch serves the faults whose cold reads are done, retries
// deferred faults, then serves the faults just read. Removes of the batch
// are already applied (drain), so no fault read with a REMOVE, nor one
// whose page was being read when the REMOVE came, can resurrect file data
// in the removed range.
func (h *handler) serveBatch() error {
	if err := h.serveColdReads(); err != nil {
		return err
	}
	if len(h.deferred) > 0 {
		order := h.order
		h.order = nil
		for _, page := range order {
			flt, ok := h.deferred[page]
			if !ok {
				continue
			}
			delete(h.deferred, page)
			if err := h.serveFault(flt); err != nil {
				return err
			}
		}
	}
	for _, flt := range h.faults {
		if h.reportedAgain(flt) {
			continue
		}
		if err := h.serveFault(flt); err != nil {
			return err
		}
	}
	return nil
}

// reportedAgain: the kernel reports a fault again when a signal interrupts
// the faulting thread and it faults anew before the install. A fault whose
// page is installed is such a report, with nobody waiting on it: every
// install wakes the page's waiters, and only a REMOVE unmaps an installed
// page, and its event is read before the kernel unmaps (so it is applied
// by now). Serving it again would read the page a second time (a lone
// 2 MiB VM's page through the mapping) for an EEXIST. The twin that
// forgets REMOVEs cannot tell a fault after a discard from a report
// again, so it serves every fault.
func (h *handler) reportedAgain(flt fault) bool {
	r := h.regions[flt.region]
	return h.isInstalled(flt.region, (flt.page-r.BaseHostVirtAddr)/r.PageSize) &&
		!h.removed.overlaps(flt.page, flt.page+r.PageSize) && !h.s.srv.cfg.ignoreRemoves
}

// isInstalled reports whether page idx of region ri is in the VMM (its bit
// in installed, set by every install that lands).
func (h *handler) isInstalled(ri int, idx uint64) bool {
	return h.installed[ri][idx/64]&(1<<(idx%64)) != 0
}

func (h *handler) serveFault(flt fault) error {
	h.noteFault(flt.region, flt.page)
	if _, busy := h.reading[flt.page]; busy {
		return nil // its read's install wakes this fault too (coldread.go rule 3)
	}
	if h.parkCold(&flt) {
		return nil // served once its page is read
	}
	r := h.regions[flt.region]
	idx := (flt.page - r.BaseHostVirtAddr) / r.PageSize
	first := !h.isInstalled(flt.region, idx) && !h.removed.overlaps(flt.page, flt.page+r.PageSize)
	// Log a first fault before the install: the install wakes the guest,
	// and anyone who has seen the guest read the page (the daemon fetching
	// the recording at the end of its window) must find it in the log. A
	// deferred install takes the entry back; its retry logs it again.
	mark := -1
	if first {
		mark = h.s.logFault(r.Offset+(flt.page-r.BaseHostVirtAddr), r.PageSize)
	}
	res, err := h.install(flt.page, flt.region, false, flt.pd)
	if err != nil {
		return err
	}
	if hook := h.s.srv.cfg.afterInstall; hook != nil && res == installed {
		hook(r.Offset + (flt.page - r.BaseHostVirtAddr))
	}
	if res != installed && mark >= 0 {
		h.s.unlogFault(mark)
	}
	if res == installAgain {
		if _, dup := h.deferred[flt.page]; !dup {
			h.deferred[flt.page] = flt
			h.order = append(h.order, flt.page)
		}
		h.s.count(func(c *counters) { c.deferred.Add(1) })
		return nil
	}
	d := time.Since(flt.read)
	h.s.count(func(c *counters) { c.observe(d) })
	return nil
}

// install puts one page into the VMM: zeros for removed ranges, holes and
// all-zero pages; otherwise the page known already (pd), or from the cache
// or the mem-file. populate installs leave zero pages to the kernel (after
// the unregister it zero-fills them itself) and do not count as faults.
func (h *handler) install(page uint64, ri int, populate bool, pd pageData) (installResult, error) {
	s := h.s
	r := h.regions[ri]
	ps := r.PageSize
	off := r.Offset + (page - r.BaseHostVirtAddr)
	// Counts of pages installed are in 4 KiB pages whatever the region's
	// page size (docs/architecture.md §8); counts of faults are events.
	base := ps / uffd.PageSize
	var data []byte
	zero, removed := false, false
	switch {
	case h.removed.overlaps(page, page+ps):
		zero, removed = true, !populate
	case !s.data.overlaps(off, off+ps):
		zero = true
		s.count(func(c *counters) { c.zeroPages.Add(base) })
	case pd.ok:
		data, zero = pd.data, pd.zero
		if zero {
			s.count(func(c *counters) { c.zeroPages.Add(base) })
		}
	default:
		var err error
		data, zero, err = h.lookup(off, ps)
		if err != nil {
			return 0, err
		}
		if zero {
			s.count(func(c *counters) { c.zeroPages.Add(base) })
		}
	}
	if populate && zero {
		return installSkipped, nil
	}
	var err error
	switch {
	case zero && ps == uffd.PageSize:
		_, err = h.f.ZeroPage(page, ps, 0)
	case zero:
		// hugetlbfs has no ZEROPAGE: copy a zero huge page.
		z := s.srv.zeroHugePage()
		_, err = h.f.Copy(uintptr(page), uintptr(unsafe.Pointer(&z[0])), ps, 0)
		runtime.KeepAlive(z)
	default:
		// data is an immutable cache entry (or our own read buffer, or a
		// window of the mapping): it cannot change or be freed during the
		// copy.
		_, err = h.f.Copy(uintptr(page), uintptr(unsafe.Pointer(&data[0])), ps, 0)
		runtime.KeepAlive(data)
		if errors.Is(err, unix.ENOMEM) && pd.mapped && !s.srv.cfg.noMappedRetry {
			// A 2 MiB copy from a window of the mapping whose pages
			// left memory again (reclaimed since populateRead) fails so:
			// install the page as any other, read through the pager's
			// cache, here on the session goroutine. Rare, and better
			// than ending the session, which would freeze the VM.
			s.count(func(c *counters) { c.copyError(unix.ENOMEM) })
			return h.install(page, ri, populate, pageData{})
		}
	}
	switch {
	case err == nil:
		// Counted only when it lands: a fault the kernel reports twice
		// (its thread was interrupted by a signal and faulted again)
		// finds the page mapped, and is not a second discarded page.
		if removed {
			s.count(func(c *counters) { c.removedFaults.Add(1) })
		}
	case errors.Is(err, unix.EEXIST):
		// Already mapped (a racing fault or populate won): success.
		s.count(func(c *counters) { c.copyError(unix.EEXIST) })
	case errors.Is(err, unix.EAGAIN):
		s.count(func(c *counters) { c.copyError(unix.EAGAIN) })
		return installAgain, nil
	case errors.Is(err, unix.ESRCH):
		s.count(func(c *counters) { c.copyError(unix.ESRCH) })
		return 0, errVMMGone
	default:
		var errno unix.Errno
		if errors.As(err, &errno) {
			s.count(func(c *counters) { c.copyError(errno) })
		}
		return 0, fmt.Errorf("install page %#x (file offset %d): %w", page, off, err)
	}
	idx := (page - r.BaseHostVirtAddr) / ps
	h.installed[ri][idx/64] |= 1 << (idx % 64)
	if populate {
		s.count(func(c *counters) { c.populated.Add(base) })
	}
	return installed, nil
}

// lookup returns the page at off from the cache, or reads it from the
// mem-file and caches it. All-zero pages are cached as markers without
// their bytes (zero is true, data nil).
func (h *handler) lookup(off, ps uint64) (data []byte, zero bool, err error) {
	s := h.s
	data, zero, hit, err := s.srv.cache.load(s.pageKey(off, ps), func() ([]byte, bool, error) {
		if hook := s.srv.cfg.beforeRead; hook != nil {
			hook(s.ctx, off)
		}
		buf := make([]byte, ps)
		t0 := time.Now()
		n, err := s.backing.ReadAt(buf, int64(off))
		d := time.Since(t0)
		s.count(func(c *counters) {
			c.backingBytes.Add(uint64(n))
			c.backingNanos.Add(uint64(d))
		})
		if n != len(buf) {
			return nil, false, fmt.Errorf("read %s at %d: %d of %d bytes: %w", s.backingPath, off, n, len(buf), err)
		}
		if allZero(buf) {
			return nil, true, nil
		}
		return buf, false, nil
	})
	if hit {
		s.count(func(c *counters) { c.hits.Add(1) })
	} else {
		s.count(func(c *counters) { c.misses.Add(1) })
	}
	return data, zero, err
}

// pageKey names the session's page of ps bytes at mem-file offset off in
// the pager's cache.
func (s *session) pageKey(off, ps uint64) pageKey {
	return pageKey{key: s.keyID, size: uint32(ps), off: off}
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if *(*uint64)(unsafe.Pointer(&b[0])) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// populateStep starts a requested populate, or installs the next chunk of
// pages, or, when every page is in, unregisters the regions so the VMM no
// longer needs the pager, and answers the requests.
func (h *handler) populateStep() error {
	s := h.s
	if !h.populating {
		s.mu.Lock()
		want := len(s.populate) > 0 && s.state == stateServing
		s.mu.Unlock()
		if !want {
			return nil
		}
		h.populating, h.popRegion, h.popPage = true, 0, 0
	}
	// At most populateBytes between event drains, so faults stay served:
	// 256 pages of 4 KiB, one of 2 MiB (256 of those would hold faults up
	// behind 512 MiB of copies).
	chunk := max(1, populateBytes/h.regions[0].PageSize)
	for n := uint64(0); n < chunk && h.popRegion < len(h.regions); n++ {
		r := h.regions[h.popRegion]
		pages := r.Size / r.PageSize
		if h.popPage >= pages {
			h.popRegion++
			h.popPage = 0
			continue
		}
		idx := h.popPage
		if !h.isInstalled(h.popRegion, idx) {
			res, err := h.install(r.BaseHostVirtAddr+idx*r.PageSize, h.popRegion, true, pageData{})
			if err != nil {
				h.finishPopulate(err)
				return err
			}
			if res == installAgain {
				h.popStalled = true
				return nil // drain events, then retry this page
			}
		}
		h.popStalled = false
		h.popPage++
	}
	if h.popRegion < len(h.regions) {
		return nil
	}
	for _, r := range h.regions {
		if err := h.f.Unregister(r.BaseHostVirtAddr, r.Size); err != nil {
			err = fmt.Errorf("populate: %w", err)
			h.finishPopulate(err)
			return err
		}
	}
	h.populated = true
	s.mu.Lock()
	s.state = statePopulated
	s.mu.Unlock()
	h.finishPopulate(nil)
	s.log.Info("session populated", "pages", s.stats.populated.Load())
	return nil
}

// populateBytes is what populate installs between event drains.
const populateBytes = 1 << 20

func (h *handler) finishPopulate(err error) {
	h.populating = false
	s := h.s
	s.mu.Lock()
	waiters := s.populate
	s.populate = nil
	s.mu.Unlock()
	for _, w := range waiters {
		w <- err
	}
}
