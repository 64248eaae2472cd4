package pager

import (
	"context"
	"errors"
	"time"

	"golang.org/x/sys/unix"
)

// Cold reads: a demand fault whose page neither the pager's cache nor the
// kernel's page cache holds is read from the mem-file off the session
// goroutine, so the session goes on while the disk works: it reads events,
// serves other faults whose pages are at hand, and replay installs its
// runs. The rules, on top of the event rules (serve.go):
//
//  1. Only a read that would wait on the disk leaves the session
//     goroutine. A page in the pager's cache is installed at once, and so
//     is one a non-blocking read (RWF_NOWAIT) gets from the page cache:
//     handing those to a reader would only add two goroutine hand-offs.
//  2. The install happens on the session goroutine, through the same
//     install as any fault, after the events read so far are applied. A
//     REMOVE read while the page was being read therefore makes it zeros,
//     never the mem-file's bytes (rule 2 of the event rules).
//  3. One read per page. A second fault of a page being read (another
//     thread, or a fault a signal interrupted) waits for the same read: the
//     install wakes every thread waiting on the page.
//  4. A page replay (or populate) installs while its read is in flight
//     makes the later install fail with EEXIST, which is success:
//     UFFDIO_COPY never replaces a present page, so nothing is installed
//     twice.
//  5. A read error ends the session, as it does for a fault served in
//     place.

// coldReaders is how many reads of one session can wait on the disk at
// once. A Firecracker VMM faults from its vCPU threads and a few device
// threads, each blocked on one page: a handful is plenty.
const coldReaders = 4

// maxColdReads bounds the faults parked for a read; past it a fault reads
// in place, as before (it cannot happen with a VMM's few threads).
const maxColdReads = 64

// pageData is a page's contents, known before its install: an all-zero
// page (zero) or its bytes. ok is false while unknown.
type pageData struct {
	data   []byte // an immutable cache entry, a page of our own, or a window of the mapping
	zero   bool
	ok     bool
	mapped bool // data is a window of the mem-file's mapping (mapped.go)
}

// coldRead is a parked fault's read, done.
type coldRead struct {
	flt fault // flt.pd holds the page when err is nil
	err error
}

// startColdReaders starts the session's readers; they stop when ctx ends
// (after their current read) and h.readers says when they have.
func (h *handler) startColdReaders(ctx context.Context) {
	if h.s.srv.cfg.syncColdReads {
		return
	}
	h.reading = make(map[uint64]fault)
	h.reads = make(chan fault, maxColdReads)
	h.readDone = make(chan coldRead, maxColdReads)
	for range coldReaders {
		h.readers.Add(1)
		go func() {
			defer h.readers.Done()
			h.coldReader(ctx)
		}()
	}
}

// coldReader reads parked faults' pages, through the pager's cache so
// sibling sessions faulting one page together read it once, and hands
// each back to the session goroutine.
func (h *handler) coldReader(ctx context.Context) {
	s := h.s
	for {
		var flt fault
		select {
		case flt = <-h.reads:
		case <-ctx.Done():
			return
		}
		r := h.regions[flt.region]
		off := r.Offset + (flt.page - r.BaseHostVirtAddr)
		var err error
		if flt.mapped {
			// A lone session's 2 MiB page, read into the page cache
			// through the mapping (mapped.go).
			if hook := s.srv.cfg.beforeRead; hook != nil {
				hook(s.ctx, off)
			}
			flt.pd, err = h.readWindow(h.faultMem[off:off+r.PageSize:off+r.PageSize], off)
		}
		if !flt.pd.ok {
			// Through the cache; also where the mapping failed, so a read
			// error is reported as for any read.
			var data []byte
			var zero bool
			data, zero, err = h.lookup(off, r.PageSize)
			if err == nil {
				flt.pd = pageData{data: data, zero: zero, ok: true}
			}
		}
		// Never blocks: at most maxColdReads faults are parked.
		h.readDone <- coldRead{flt: flt, err: err}
		s.kick()
	}
}

// parkCold decides whether flt's page must be read from the disk and, if
// so, hands the read to a reader and reports true: the fault is served
// when the read is done (serveColdReads). Otherwise flt.pd holds the page
// when the pager's cache or the page cache had it (or stays unknown, for a
// page that needs no read or a read done in place).
func (h *handler) parkCold(flt *fault) bool {
	if flt.pd.ok {
		return false
	}
	s := h.s
	r := h.regions[flt.region]
	ps := r.PageSize
	off := r.Offset + (flt.page - r.BaseHostVirtAddr)
	if h.removed.overlaps(flt.page, flt.page+ps) || !s.data.overlaps(off, off+ps) {
		return false // zeros: no read
	}
	if w := h.mappedWindow(off, ps); w != nil {
		return h.parkMapped(flt, w, off)
	}
	if h.reads == nil {
		return false
	}
	// The cache, else a read that does not wait, shared with siblings
	// reading the page at the same time as load's reads are.
	data, zero, hit, ok := s.srv.cache.tryLoad(s.pageKey(off, ps), func() ([]byte, bool, error) {
		return h.readNoWait(off, ps)
	})
	if ok {
		s.count(func(c *counters) {
			if hit {
				c.hits.Add(1)
			} else {
				c.misses.Add(1)
			}
		})
		flt.pd = pageData{data: data, zero: zero, ok: true}
		return false
	}
	if len(h.reading) >= maxColdReads {
		return false
	}
	h.reading[flt.page] = *flt
	h.reads <- *flt // room: fewer than maxColdReads are parked
	s.count(func(c *counters) { c.coldReads.Add(1) })
	return true
}

// parkMapped is parkCold for a page served from the mapping of the
// mem-file (mapped.go): from the pager's cache if it has it; else from
// the mapping, in place when the page cache holds the whole page, else
// parked for a cold reader to read it through the mapping. Where the
// mapping fails, flt.pd stays unknown and install reads the page as any.
func (h *handler) parkMapped(flt *fault, w []byte, off uint64) bool {
	s := h.s
	if data, zero, ok := s.srv.cache.get(s.pageKey(off, uint64(len(w)))); ok {
		s.count(func(c *counters) { c.hits.Add(1) })
		flt.pd = pageData{data: data, zero: zero, ok: true}
		return false
	}
	if h.reads != nil && len(h.reading) < maxColdReads && !h.inPageCache(off, uint64(len(w))) {
		flt.mapped = true
		h.reading[flt.page] = *flt
		h.reads <- *flt // room: fewer than maxColdReads are parked
		s.count(func(c *counters) { c.coldReads.Add(1) })
		return true
	}
	if pd, err := h.readWindow(w, off); err == nil {
		flt.pd = pd
	}
	return false
}

// errWouldWait: the page is not in the kernel's page cache.
var errWouldWait = errors.New("the read would wait on the disk")

// readNoWait reads the page at off if the kernel's page cache holds it,
// without waiting on the disk (RWF_NOWAIT); else errWouldWait. An all-zero
// page is zero, without its bytes.
func (h *handler) readNoWait(off, ps uint64) (data []byte, zero bool, err error) {
	if h.noWait == nil {
		return nil, false, errWouldWait
	}
	buf := make([]byte, ps)
	var n int
	var rerr error
	t0 := time.Now()
	err = h.noWait.Control(func(fd uintptr) {
		n, rerr = unix.Preadv2(int(fd), [][]byte{buf}, int64(off), unix.RWF_NOWAIT)
	})
	if err == nil {
		err = rerr
	}
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) {
		h.noWait = nil // this filesystem cannot: every miss goes to a reader
		return nil, false, errWouldWait
	}
	if err != nil || n != len(buf) {
		return nil, false, errWouldWait
	}
	d := time.Since(t0)
	h.s.count(func(c *counters) {
		c.backingBytes.Add(uint64(n))
		c.backingNanos.Add(uint64(d))
	})
	if allZero(buf) {
		return nil, true, nil
	}
	return buf, false, nil
}

// serveColdReads serves the parked faults whose reads are done.
func (h *handler) serveColdReads() error {
	for {
		var done coldRead
		select {
		case done = <-h.readDone:
		default:
			return nil
		}
		delete(h.reading, done.flt.page)
		if h.populated {
			// Populate installed the page before it unregistered the
			// regions (which woke the fault); an install now would fail.
			continue
		}
		if done.err != nil {
			return done.err
		}
		if err := h.serveFault(done.flt); err != nil {
			return err
		}
	}
}

// stopColdReaders waits for the readers, which ctx's end has stopped.
func (h *handler) stopColdReaders() {
	h.readers.Wait()
}
