package pager

import (
	"sync"
	"sync/atomic"
)

// pageKey names one page of one snapshot: the interned cache key, the
// page's byte offset in the mem-file and its size (a region's page size).
// The size is part of the name because an entry stands for exactly its
// bytes: a 4 KiB all-zero marker at a 2 MiB boundary says nothing of the
// 2 MiB page there, so pages of one key at two sizes never alias.
type pageKey struct {
	key  uint32
	size uint32
	off  uint64
}

// entryOverhead is what an entry costs besides its data (map slot, slot
// struct), charged against the budget so zero markers are not free.
const entryOverhead = 64

// cacheShards spreads lock contention between sessions faulting at once.
const cacheShards = 64

// pageCache is the process-wide page cache: pages of mem-files keyed by
// (cache key, offset), bounded in bytes, evicted by CLOCK (second chance).
//
// Entries are immutable: a page's bytes are never rewritten, and eviction
// only drops the reference, so a caller may UFFDIO_COPY from a slice it got
// from get while another goroutine evicts it (the GC keeps it alive for the
// caller, and Go's heap does not move objects).
type pageCache struct {
	shards [cacheShards]cacheShard
	budget int64 // per shard
	bytes  atomic.Int64
	evicts atomic.Uint64

	// noSingleFlight turns off the sharing of one read among concurrent
	// misses of a page. It exists only so a test can show that its check
	// catches the loss; never set it elsewhere.
	noSingleFlight bool
}

type cacheShard struct {
	mu    sync.Mutex
	index map[pageKey]int // key → slot; guarded by mu
	slots []cacheSlot     // guarded by mu
	hand  int             // CLOCK hand over slots; guarded by mu
	bytes int64           // guarded by mu
	free  []int           // slots emptied by eviction; guarded by mu
	// inflight are pages being read from a mem-file: concurrent misses of
	// one page (sibling VMs starting together) wait for the one read.
	inflight map[pageKey]*flight // guarded by mu
}

// flight is one mem-file read that other lookups of the page wait for.
type flight struct {
	done    chan struct{} // closed when data, zero and err are set
	waiters int           // lookups waiting for this read; guarded by the shard's mu
	data    []byte
	zero    bool
	err     error
}

type cacheSlot struct {
	key  pageKey
	data []byte // nil with zero set: the page is all zeros
	zero bool
	used bool // slot holds an entry
	ref  bool // CLOCK reference bit: set on hit, cleared as the hand passes
}

func newPageCache(budgetBytes int64) *pageCache {
	c := &pageCache{budget: max(budgetBytes, 0) / cacheShards}
	for i := range c.shards {
		c.shards[i].index = make(map[pageKey]int)
		c.shards[i].inflight = make(map[pageKey]*flight)
	}
	return c
}

// load returns page k from the cache, or reads it with read
// and caches it. Concurrent loads of one missing page share one read: the
// first caller reads, the others wait and count as hits (hit is true for
// them), so N siblings faulting a page together read it once.
func (c *pageCache) load(k pageKey, read func() ([]byte, bool, error)) (data []byte, zero, hit bool, err error) {
	s := c.shard(k)
	s.mu.Lock()
	if data, zero, ok := s.cachedLocked(k); ok {
		s.mu.Unlock()
		return data, zero, true, nil
	}
	if f, ok := s.inflight[k]; ok && !c.noSingleFlight {
		f.waiters++
		s.mu.Unlock()
		<-f.done
		if f.err == nil {
			return f.data, f.zero, true, nil
		}
		// The leader failed: read ourselves.
		data, zero, err := read()
		return data, zero, false, err
	}
	f := c.lead(s, k, read)
	return f.data, f.zero, false, f.err
}

// tryLoad is load for a caller that must not wait on another's read: it
// returns the cached page, or reads it with read when no other lookup is
// reading it (concurrent loads of the page then wait for this read, as
// for load's). ok is false when another lookup is reading the page or read
// failed (say, it would wait on the disk): the caller goes through load.
func (c *pageCache) tryLoad(k pageKey, read func() ([]byte, bool, error)) (data []byte, zero, hit, ok bool) {
	s := c.shard(k)
	s.mu.Lock()
	if data, zero, ok := s.cachedLocked(k); ok {
		s.mu.Unlock()
		return data, zero, true, true
	}
	if _, busy := s.inflight[k]; busy && !c.noSingleFlight {
		s.mu.Unlock()
		return nil, false, false, false
	}
	f := c.lead(s, k, read) // a waiter of a failed read reads itself (load)
	return f.data, f.zero, false, f.err == nil
}

// cachedLocked returns page k if the shard holds it (or an all-zero
// marker of it) and marks it used; s.mu is held.
func (s *cacheShard) cachedLocked(k pageKey) (data []byte, zero, ok bool) {
	i, found := s.index[k]
	if !found {
		return nil, false, false
	}
	sl := &s.slots[i]
	sl.ref = true
	return sl.data, sl.zero, true
}

// lead reads page k as the leader of a flight: called with s.mu held (it
// releases it), it registers the flight unless another is (noSingleFlight),
// reads, caches a good read, and wakes the flight's waiters.
func (c *pageCache) lead(s *cacheShard, k pageKey, read func() ([]byte, bool, error)) *flight {
	f := &flight{done: make(chan struct{})}
	if _, ok := s.inflight[k]; !ok {
		s.inflight[k] = f
	}
	s.mu.Unlock()
	f.data, f.zero, f.err = read()
	if f.err == nil {
		c.put(k, f.data, f.zero)
	}
	s.mu.Lock()
	if s.inflight[k] == f {
		delete(s.inflight, k)
	}
	s.mu.Unlock()
	close(f.done)
	return f
}

func (c *pageCache) shard(k pageKey) *cacheShard {
	h := uint64(k.key)*0x9E3779B97F4A7C15 ^ (k.off>>12)*0xC2B2AE3D27D4EB4F
	h ^= h >> 29
	return &c.shards[h%cacheShards]
}

// get returns the cached page (data, or zero=true for an all-zero page).
func (c *pageCache) get(k pageKey) (data []byte, zero, ok bool) {
	s := c.shard(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	i, ok := s.index[k]
	if !ok {
		return nil, false, false
	}
	sl := &s.slots[i]
	sl.ref = true
	return sl.data, sl.zero, true
}

// put caches a page; data must not be modified afterwards. zero records an
// all-zero page without its bytes. A page larger than a shard's budget is
// not cached.
func (c *pageCache) put(k pageKey, data []byte, zero bool) {
	if zero {
		data = nil
	}
	cost := int64(len(data)) + entryOverhead
	if cost > c.budget {
		return
	}
	s := c.shard(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.index[k]; ok {
		return // a sibling session raced us to it; entries are identical
	}
	for s.bytes+cost > c.budget {
		c.evictOne(s)
	}
	slot := cacheSlot{key: k, data: data, zero: zero, used: true}
	var i int
	if n := len(s.free); n > 0 {
		i, s.free = s.free[n-1], s.free[:n-1]
		s.slots[i] = slot
	} else {
		i = len(s.slots)
		s.slots = append(s.slots, slot)
	}
	s.index[k] = i
	s.bytes += cost
	c.bytes.Add(cost)
}

// evictOne advances s's CLOCK hand to the first used slot whose reference
// bit is clear, clearing bits on the way, and drops it. s.mu must be held
// and s must hold at least one entry.
func (c *pageCache) evictOne(s *cacheShard) {
	for {
		if s.hand >= len(s.slots) {
			s.hand = 0
		}
		sl := &s.slots[s.hand]
		s.hand++
		if !sl.used {
			continue
		}
		if sl.ref {
			sl.ref = false
			continue
		}
		cost := int64(len(sl.data)) + entryOverhead
		delete(s.index, sl.key)
		*sl = cacheSlot{}
		s.free = append(s.free, s.hand-1)
		s.bytes -= cost
		c.bytes.Add(-cost)
		c.evicts.Add(1)
		return
	}
}

// len counts entries (for stats).
func (c *pageCache) len() int {
	n := 0
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		n += len(s.index)
		s.mu.Unlock()
	}
	return n
}
