package pager

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/uffd"
)

// Faults of 2 MiB pages served from a mapping of the mem-file.
//
// A 2 MiB fault that misses the pager's cache used to read its page into
// a fresh 2 MiB buffer (make + pread: 0.4-0.9 ms on this host) before the
// UFFDIO_COPY (~0.3 ms), and cache it. A session of 2 MiB pages with no
// other live session of its cache key (a lone VM) now serves such a miss
// straight from a read-only shared mapping of the mem-file (one per file,
// memmap.go): the kernel's page cache is the copy's source, as it is for
// replay (prefetch.go). A lone VM never asks the pager for a page again
// once installed, so a heap copy of it helps nobody; with siblings live a
// miss still goes through the cache, read once for all of them. The rules,
// on top of the event and cold-read rules:
//
//  1. Only a page whose whole 2 MiB range the page cache holds (mincore)
//     is served in place. Any other goes to a cold reader, which reads it
//     into the page cache through the mapping (MADV_POPULATE_READ, which
//     may wait on the disk, off the session goroutine) and hands it back:
//     the session goroutine never waits on the disk for it.
//  2. The install is the same install as every fault's, on the session
//     goroutine, after the events read so far are applied: REMOVE first,
//     never over a present page, EEXIST/EAGAIN/ESRCH as for any fault.
//  3. Reads of the mapping (the all-zero check) go through readMapped, so
//     a mem-file that shrank is an error, never a SIGBUS of the pager.
//  4. The session's reference to the mapping (memmap.go, shared with the
//     siblings reading the same mem-file) is dropped when serve returns,
//     after the cold readers have stopped: every fault that refers to it
//     (served, deferred or parked) belongs to this serve loop.
//
// Counts: such a page is a cache miss (misses) and a mapped fault
// (mapped_faults); its 2 MiB count in backing_bytes, as every read of the
// mem-file does; it is not cached, except as an all-zero marker when it
// reads back all zeros.

// mapFaults maps the mem-file for faults served from it (h.faultMem),
// for regions of pages larger than 4 KiB; a 4 KiB page is cheaper to read
// than to look up in the page cache.
func (h *handler) mapFaults() {
	s := h.s
	if h.regions[0].PageSize == uffd.PageSize || s.backingSize == 0 || s.srv.cfg.noMappedFaults {
		return
	}
	mem := h.mapping()
	if mem == nil {
		return
	}
	res, err := prefetch.OpenResidency(s.backing)
	if err != nil {
		s.log.Warn("faults read the mem-file into buffers: its page-cache residency cannot be queried", "err", err)
		return
	}
	h.faultMem, h.resident = mem, res
}

// unmapFaults stops serving faults from the mapping, once nothing can
// refer to it (rule 4); serve then drops the session's reference to it.
func (h *handler) unmapFaults() {
	if h.faultMem != nil {
		h.resident.Close()
		h.faultMem, h.resident = nil, nil
	}
}

// mapping returns the session's read-only shared mapping of its mem-file
// (memmap.go), taking the session's reference to it the first time; nil
// when the file cannot be mapped (reads then go into buffers).
func (h *handler) mapping() []byte {
	s := h.s
	if h.fmap == nil && !h.mapFailed && s.backingSize > 0 {
		fm, err := s.srv.memMaps.acquire(s.backing, s.backingID)
		if err != nil {
			h.mapFailed = true
			s.log.Warn("the pager reads the mem-file into buffers: it cannot be mapped", "err", err)
			return nil
		}
		h.fmap = fm
	}
	if h.fmap == nil {
		return nil
	}
	return h.fmap.mem
}

// releaseMapping drops the session's reference to its mem-file's mapping,
// when serve returns: its reader and cold readers have stopped, and no
// run, fault or install refers to the mapping any more (memmap.go, rule
// 1). Siblings holding it keep it mapped.
func (h *handler) releaseMapping() {
	if h.fmap != nil {
		h.s.srv.memMaps.release(h.fmap)
		h.fmap = nil
	}
}

// mappedWindow returns the mapping's window of the page at mem-file offset
// off, when a miss of it is served from the mapping: a 2 MiB page of a
// lone session within the mapping. Else nil.
func (h *handler) mappedWindow(off, ps uint64) []byte {
	if h.faultMem == nil || off+ps > uint64(len(h.faultMem)) || h.s.srv.liveSiblings(h.s) > 0 {
		return nil
	}
	return h.faultMem[off : off+ps : off+ps]
}

// inPageCache reports whether the page cache holds every 4 KiB page of the
// page of ps bytes at mem-file offset off, without reading any.
func (h *handler) inPageCache(off, ps uint64) bool {
	in, total, err := h.resident.Count([]prefetch.Run{{Page: off / uffd.PageSize, Pages: ps / uffd.PageSize}})
	return err == nil && in == total && total == ps/uffd.PageSize
}

// populateRead brings w, a window of a mapped mem-file, into memory in one
// call (MADV_POPULATE_READ: from the page cache, or the disk) before its
// pages are installed. A kernel before 5.14 answers EINVAL (every call does
// with cfg.noPopulateRead, a test's stand-in for one): then one byte of every 4 KiB
// page is read instead, through readMapped, so the install that follows
// still finds every page in memory either way. (Should the page cache drop
// them again before the install, install reads the page again.)
func populateRead(w []byte, cfg *Config) error {
	if cfg.unpopulatedWindows {
		return nil
	}
	var err error = unix.EINVAL
	if !cfg.noPopulateRead {
		err = unix.Madvise(w, unix.MADV_POPULATE_READ)
	}
	if !errors.Is(err, unix.EINVAL) {
		return err
	}
	return readMapped(func() { touchPages(w) })
}

// touched keeps touchPages' reads from being optimized away (atomic: the
// readers of several sessions touch pages at once).
var touched atomic.Uint32

// touchPages reads one byte of every 4 KiB page of w.
func touchPages(w []byte) {
	var b byte
	for i := 0; i < len(w); i += uffd.PageSize {
		b |= w[i]
	}
	touched.Store(uint32(b))
}

// readWindow makes w's page known from the mapping: it populates w (from
// the page cache, or the disk when called by a cold reader) and checks
// whether it reads all zeros; an all-zero page is cached as a marker. It
// counts the read, and the fault as a mapped miss.
func (h *handler) readWindow(w []byte, off uint64) (pageData, error) {
	s := h.s
	t0 := time.Now()
	if err := populateRead(w, &s.srv.cfg); err != nil {
		return pageData{}, fmt.Errorf("read %s at %d: %w", s.backingPath, off, err)
	}
	var zero bool
	if err := readMapped(func() { zero = allZero(w) }); err != nil {
		return pageData{}, fmt.Errorf("read %s at %d: %w", s.backingPath, off, err)
	}
	d := time.Since(t0)
	s.count(func(c *counters) {
		c.misses.Add(1)
		c.mappedFaults.Add(1)
		c.backingBytes.Add(uint64(len(w)))
		c.backingNanos.Add(uint64(d))
	})
	if zero {
		s.srv.cache.put(s.pageKey(off, uint64(len(w))), nil, true)
		return pageData{zero: true, ok: true}, nil
	}
	return pageData{data: w, ok: true, mapped: true}, nil
}
