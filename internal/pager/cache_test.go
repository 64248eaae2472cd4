package pager

import (
	"bytes"
	"fmt"
	"sync/atomic"
	"testing"
)

// sameShardKeys returns n keys of one cache key that land in one shard, so
// a test can drive one shard's CLOCK.
func sameShardKeys(c *pageCache, n int) []pageKey {
	var keys []pageKey
	want := c.shard(pageKey{key: 1, off: 0})
	for off := uint64(0); len(keys) < n; off += 4096 {
		if k := (pageKey{key: 1, off: off}); c.shard(k) == want {
			keys = append(keys, k)
		}
	}
	return keys
}

func page(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }

// TestCacheClockGivesReferencedPagesASecondChance: with room for two pages
// per shard, a page read since it was cached survives the next insert and
// the unreferenced one goes. The twin (no read) shows the first-in page is
// the one evicted when nothing is referenced, so the reference bit is what
// saved it.
func TestCacheClockGivesReferencedPagesASecondChance(t *testing.T) {
	tests := []struct {
		name        string
		touchFirst  bool
		wantEvicted int // index of the key evicted by the third put
	}{
		{"referenced first page survives", true, 1},
		{"twin: unreferenced first page is evicted", false, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newPageCache(2 * (4096 + entryOverhead) * cacheShards)
			k := sameShardKeys(c, 3)
			c.put(k[0], page(1), false)
			c.put(k[1], page(2), false)
			if tt.touchFirst {
				if _, _, ok := c.get(k[0]); !ok {
					t.Fatal("first page missing before eviction")
				}
			}
			c.put(k[2], page(3), false)
			for i, key := range k {
				_, _, ok := c.get(key)
				if want := i != tt.wantEvicted; ok != want {
					t.Errorf("key %d cached = %v, want %v", i, ok, want)
				}
			}
			if c.evicts.Load() != 1 {
				t.Errorf("evictions = %d, want 1", c.evicts.Load())
			}
		})
	}
}

func TestCacheStaysWithinBudget(t *testing.T) {
	budget := int64(64 * (4096 + entryOverhead))
	c := newPageCache(budget)
	data := page(7)
	for off := uint64(0); off < 10000*4096; off += 4096 {
		c.put(pageKey{key: 1, off: off}, data, false)
		if b := c.bytes.Load(); b > budget {
			t.Fatalf("cache bytes %d over budget %d after offset %d", b, budget, off)
		}
	}
	if c.evicts.Load() == 0 || c.len() == 0 {
		t.Fatalf("evictions %d, entries %d: want both > 0", c.evicts.Load(), c.len())
	}
}

func TestCacheEntriesOutliveEviction(t *testing.T) {
	// A page handed to UFFDIO_COPY must not change when it is evicted and
	// its slot reused.
	c := newPageCache(1 * (4096 + entryOverhead) * cacheShards)
	k := sameShardKeys(c, 2)
	c.put(k[0], page(0xAA), false)
	got, _, _ := c.get(k[0])
	c.put(k[1], page(0xBB), false) // evicts k[0], reuses its slot
	if _, _, ok := c.get(k[0]); ok {
		t.Fatal("k[0] still cached; the test needs it evicted")
	}
	if !bytes.Equal(got, page(0xAA)) {
		t.Fatal("bytes of an evicted entry changed under its reader")
	}
}

func TestCacheZeroMarkersCostNoPageBytes(t *testing.T) {
	c := newPageCache(1 << 20)
	c.put(pageKey{key: 1, off: 0}, make([]byte, 4096), true)
	data, zero, ok := c.get(pageKey{key: 1, off: 0})
	if !ok || !zero || data != nil {
		t.Fatalf("get zero marker = %v %v %v, want nil data, zero, ok", data, zero, ok)
	}
	if c.bytes.Load() != entryOverhead {
		t.Fatalf("zero marker costs %d bytes, want %d", c.bytes.Load(), entryOverhead)
	}
}

func TestCacheDisabledWithZeroBudget(t *testing.T) {
	c := newPageCache(0)
	c.put(pageKey{key: 1}, page(1), false)
	if _, _, ok := c.get(pageKey{key: 1}); ok {
		t.Fatal("a zero-budget cache cached a page")
	}
}

func TestCacheKeysDoNotCollide(t *testing.T) {
	c := newPageCache(1 << 24)
	c.put(pageKey{key: 1, off: 4096}, page(1), false)
	c.put(pageKey{key: 2, off: 4096}, page(2), false)
	a, _, _ := c.get(pageKey{key: 1, off: 4096})
	b, _, _ := c.get(pageKey{key: 2, off: 4096})
	if a[0] != 1 || b[0] != 2 {
		t.Fatalf("same offset of two cache keys: got %d and %d, want 1 and 2", a[0], b[0])
	}
}

// TestCacheConcurrentMissesShareOneRead: siblings faulting one page at
// once read the mem-file once; the others wait and count as hits. The
// leader's read is held until all 7 followers are known to be waiting for
// it (or one of them has read for itself), so the outcome never depends on
// scheduling. Twin: with single-flight off the same check fails, every time.
func TestCacheConcurrentMissesShareOneRead(t *testing.T) {
	for _, off := range []bool{false, true} {
		name := "single-flight"
		if off {
			name = "twin: single-flight off"
		}
		t.Run(name, func(t *testing.T) {
			c := newPageCache(1 << 24)
			c.noSingleFlight = off
			err := checkOneRead(concurrentMisses(t, c, 7))
			switch {
			case !off && err != nil:
				t.Fatal(err)
			case off && err == nil:
				t.Fatal("with single-flight off the check still passed: it cannot catch the loss")
			case off:
				t.Logf("caught, as it must be: %v", err)
			}
		})
	}
}

// checkOneRead says what is wrong with concurrentMisses' counts of 1 leader
// and 7 followers: one read in all, 7 hits, no follower reading itself.
func checkOneRead(reads, hits, followerReads int) error {
	if reads != 1 || hits != 7 || followerReads != 0 {
		return fmt.Errorf("%d reads (%d by followers), %d hits; want 1 read and 7 hits", reads, followerReads, hits)
	}
	return nil
}

// concurrentMisses has a leader and n followers load one page at once and
// returns how many read the mem-file, how many counted a hit and how many
// followers read it themselves. The
// leader's read blocks until every follower either waits on the leader's
// flight or has run its own read.
func concurrentMisses(t *testing.T, c *pageCache, n int) (reads, hits, followerReads int) {
	t.Helper()
	k := pageKey{key: 1, off: 8192}
	s := c.shard(k)
	release := make(chan struct{})
	var readCount atomic.Int32
	read := func() ([]byte, bool, error) {
		readCount.Add(1)
		<-release
		return page(9), false, nil
	}
	type result struct {
		data []byte
		hit  bool
	}
	results := make(chan result, n+1)
	go func() {
		d, _, hit, _ := c.load(k, read)
		results <- result{d, hit}
	}()
	waitFor(t, "the leader's flight", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.inflight[k] != nil
	})
	var followers atomic.Int32
	for range n {
		go func() {
			d, _, hit, _ := c.load(k, func() ([]byte, bool, error) {
				followers.Add(1)
				readCount.Add(1)
				return page(9), false, nil
			})
			results <- result{d, hit}
		}()
	}
	// The followers are in place once each waits on the flight or has
	// read (and returned) on its own.
	done := 0
	var got []result
	waitFor(t, "every follower waiting on the leader's read or reading itself", func() bool {
		for {
			select {
			case r := <-results:
				got = append(got, r)
				done++
				continue
			default:
			}
			break
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.inflight[k].waiters+done == n
	})
	close(release)
	for len(got) < n+1 {
		got = append(got, <-results)
	}
	for _, r := range got {
		if !bytes.Equal(r.data, page(9)) {
			t.Fatal("a loader got the wrong bytes")
		}
		if r.hit {
			hits++
		}
	}
	return int(readCount.Load()), hits, int(followers.Load())
}

// TestCacheTryLoadNeverWaitsOnAnotherRead: a tryLoad of a page another
// lookup is reading returns at once without reading; once read, it hits;
// a tryLoad whose read fails caches nothing, and a load then reads.
func TestCacheTryLoadNeverWaitsOnAnotherRead(t *testing.T) {
	c := newPageCache(1 << 20)
	k := pageKey{key: 1, off: 0}
	reading, release, done := make(chan struct{}), make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		c.load(k, func() ([]byte, bool, error) {
			close(reading)
			<-release
			return page(1), false, nil
		})
	}()
	<-reading
	_, _, _, ok := c.tryLoad(k, func() ([]byte, bool, error) {
		t.Error("tryLoad read a page another lookup is reading")
		return page(2), false, nil
	})
	if ok {
		t.Error("tryLoad of a page being read: ok, want not (the caller goes through load)")
	}
	close(release)
	<-done
	data, _, hit, ok := c.tryLoad(k, func() ([]byte, bool, error) {
		t.Error("tryLoad read a cached page")
		return page(2), false, nil
	})
	if !ok || !hit || data[0] != 1 {
		t.Errorf("tryLoad of a cached page: ok %v hit %v data %x, want the cached page", ok, hit, data[:1])
	}

	k2 := pageKey{key: 1, off: 4096}
	if _, _, _, ok := c.tryLoad(k2, func() ([]byte, bool, error) { return nil, false, errWouldWait }); ok {
		t.Error("tryLoad with a failed read: ok")
	}
	if _, _, cached := c.get(k2); cached {
		t.Error("a failed tryLoad cached the page")
	}
	data, _, hit, err := c.load(k2, func() ([]byte, bool, error) { return page(3), false, nil })
	if err != nil || hit || data[0] != 3 {
		t.Errorf("load after a failed tryLoad: %x hit %v err %v, want its own read", data[:1], hit, err)
	}
}
