package pager

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/testenv"
	"github.com/forkd/forkd/internal/uffd"
)

// dropPageCache writes the mem-file at path back and drops it from the
// kernel's page cache, so a fault of any of its pages has to wait on the
// disk (a cold read), and checks that pages [lo, hi) are gone (hi 0: to
// the end). It fails where the page cache cannot be dropped (a mem-file on
// tmpfs): these tests need a disk-backed TMPDIR. The consumer's cold step
// calls it too, after reading the mem-file it checks pages against (while
// a replay may be reading other pages back in).
func dropPageCache(path string, lo, hi uint64) error {
	if err := testenv.EvictPageCache(path); err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	res, err := prefetch.OpenResidency(f)
	if err != nil {
		return err
	}
	defer res.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if hi == 0 {
		hi = uint64(st.Size()) / uffd.PageSize
	}
	in, _, err := res.Count([]prefetch.Run{{Page: lo, Pages: hi - lo}})
	if err != nil {
		return err
	}
	if in != 0 {
		return fmt.Errorf("%d pages of %s [%d, %d) stay in the page cache after FADV_DONTNEED: run with TMPDIR on a disk-backed filesystem", in, path, lo, hi)
	}
	return nil
}

// holdRead is a beforeRead hook that holds the read of one page until
// released, and says when a read of it has begun.
type holdRead struct {
	off     uint64
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func newHoldRead(t *testing.T, page uint64) *holdRead {
	h := &holdRead{off: page * uffd.PageSize, entered: make(chan struct{}), release: make(chan struct{})}
	t.Cleanup(h.free)
	return h
}

func (h *holdRead) hook(ctx context.Context, off uint64) {
	if off != h.off {
		return
	}
	select {
	case <-h.entered:
	default:
		close(h.entered)
	}
	select {
	case <-h.release:
	case <-ctx.Done():
	}
}

func (h *holdRead) free() { h.once.Do(func() { close(h.release) }) }

// waitEntered waits for the held read to begin.
func (h *holdRead) waitEntered(t *testing.T) {
	t.Helper()
	select {
	case <-h.entered:
	case <-time.After(60 * time.Second):
		t.Fatal("the fault's read of the held page never began")
	}
}

// TestColdReadDoesNotHoldUpTheSession: while one fault's page is read from
// the disk (held here), replay installs the whole working set and the
// guest's other faults, of pages the pager has cached, are served; then
// the held page arrives with the mem-file's bytes. With the read done in
// place (the syncColdReads hook) the session waits on it and replay never
// finishes: this test then fails waiting for replay (checked by hand).
func TestColdReadDoesNotHoldUpTheSession(t *testing.T) {
	requireUffd(t)
	const cold = 4000 // far from the working set: no readahead reaches it
	hold := newHoldRead(t, cold)
	p := startPager(t, Config{CacheBytes: cacheBytes, beforeRead: hold.hook, parkEveryMiss: true})
	mem := memFile(t, p.dir, testPages, -1, 0, 0)
	if err := dropPageCache(mem, 0, 0); err != nil {
		t.Fatal(err)
	}
	const ws = 1024
	path := writeRecording(t, p.dir, "abc", testPages, seqPages(0, ws))
	s, err := p.client.CreateSession(context.Background(), SessionRequest{SessionID: "vm", BackingPath: mem, CacheKey: "abc", PrefetchPath: path})
	if err != nil {
		t.Fatal(err)
	}
	// One thread faults the cold page and waits; the other, once replay
	// is done, reads the working set: installed pages and the probes,
	// which the replay's reader cached.
	c := startConsumer(t, s.SocketPath, mem, testSize, "good",
		fmt.Sprintf("cold:%d-%d,bg:seq:%d-%d,wait,seq:0-%d,wait,bgwait,wait", cold, cold+1, cold, cold+1, ws))
	c.expect("waiting")
	hold.waitEntered(t)
	waitFor(t, "replay to finish while a fault's read is held", func() bool { return p.sessionStats(t, "vm").Prefetch.Done })
	c.resume()
	c.expect("touch_ns")
	c.expect("waiting")
	held := p.sessionStats(t, "vm")
	hold.free()
	c.resume()
	c.expect("bg done")
	c.expect("waiting")
	st := p.sessionStats(t, "vm")
	c.resume()
	c.finish()

	probes := uint64(ws / probeStride(ws))
	if held.PrefetchedPages != ws-probes {
		t.Errorf("while the read was held: prefetched %d pages, want %d", held.PrefetchedPages, ws-probes)
	}
	if held.PrefetchProbeFaults != probes || held.Hits < probes {
		t.Errorf("while the read was held: %d probe faults, %d cache hits; want the %d probes served from the cache",
			held.PrefetchProbeFaults, held.Hits, probes)
	}
	if held.ColdReads != 1 {
		t.Errorf("cold reads %d while held, want 1 (the held page)", held.ColdReads)
	}
	if st.ColdReads != 1 || st.Misses < 1 {
		t.Errorf("at the end: cold reads %d, misses %d; want the held page read once", st.ColdReads, st.Misses)
	}
}

// TestRemoveDuringAColdReadGivesZeros: a page the guest discards while its
// fault's read is in flight reads as zeros, not as the mem-file's bytes
// the read brings back. The twin forgets removed ranges and the guest sees
// the stale bytes.
func TestRemoveDuringAColdReadGivesZeros(t *testing.T) {
	requireUffd(t)
	tests := []struct {
		name string
		cfg  Config
		twin bool
	}{
		{"removed ranges remembered", Config{}, false},
		{"twin: removed ranges forgotten", Config{ignoreRemoves: true}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const cold = 300
			hold := newHoldRead(t, cold)
			tt.cfg.CacheBytes, tt.cfg.beforeRead, tt.cfg.parkEveryMiss = cacheBytes, hold.hook, true
			p := startPager(t, tt.cfg)
			mem := memFile(t, p.dir, 512, -1, 0, 0)
			if err := dropPageCache(mem, 0, 0); err != nil {
				t.Fatal(err)
			}
			s := p.create(t, "vm", mem, "abc")
			// A thread faults page 300 and checks it reads zeros; while
			// its read is held the balloon discards the page.
			c := startConsumer(t, s.SocketPath, mem, 512*uffd.PageSize, "good",
				fmt.Sprintf("cold:%d-%d,bg:zeros:%d-%d,wait,dontneed:%d-%d,wait,bgwait,wait", cold, cold+1, cold, cold+1, cold, cold+1))
			c.expect("waiting")
			hold.waitEntered(t)
			c.resume()
			c.expect("waiting") // the discard returned: the pager read its REMOVE
			// Read, not yet applied: the madvise returns once the pager has
			// read the event, and the session counts it just after.
			var held SessionInfo
			waitFor(t, "the REMOVE applied while the read is held", func() bool {
				held = p.sessionStats(t, "vm")
				return held.Removes >= 1
			})
			hold.free()
			c.resume()
			if tt.twin {
				line := c.expect("FAIL")
				if !strings.Contains(line, "not zero after discard") {
					t.Fatalf("twin: consumer failed with %q, want a non-zero discarded page", line)
				}
				return
			}
			c.expect("bg done")
			c.expect("waiting")
			c.resume()
			c.finish()
			if held.Removes < 1 || held.ColdReads != 1 {
				t.Errorf("while the read was held: removes %d, cold reads %d; want the REMOVE applied during the one read", held.Removes, held.ColdReads)
			}
		})
	}
}
