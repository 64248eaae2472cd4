package pager

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/uffd"
)

// writeRecording stores a working-set recording of key for a mem-file of
// pages pages and returns its path.
func writeRecording(t testing.TB, dir, key string, pages int, order []uint64) string {
	t.Helper()
	path := filepath.Join(dir, key+".ws")
	err := prefetch.Write(path, prefetch.Recording{Key: key, PageSize: uffd.PageSize, FileSize: int64(pages * uffd.PageSize),
		Source: prefetch.SourceUffd, Window: time.Second, RecordedAt: time.Now(), Pages: order})
	if err != nil {
		t.Fatal(err)
	}
	return path
}

func seqPages(lo, hi uint64) []uint64 {
	var out []uint64
	for p := lo; p < hi; p++ {
		out = append(out, p)
	}
	return out
}

// TestSessionRecordsFirstFaultsInOrder: a recording session logs each
// page's first fault, in order, up to record_pages; a second touch adds
// nothing. A page the guest has read is in the log: the pager is held
// right after installing the last page (the guest runs on, the log is
// read) and the page must already be there.
func TestSessionRecordsFirstFaultsInOrder(t *testing.T) {
	requireUffd(t)
	release := make(chan struct{})
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	p := startPager(t, Config{CacheBytes: cacheBytes, afterInstall: func(off uint64) {
		if off == 99*uffd.PageSize {
			<-release
		}
	}})
	mem := memFile(t, p.dir, 512, -1, 0, 0)
	ctx := context.Background()
	script := "seq:100-200,seq:0-100,touch:0-200,wait"

	s, err := p.client.CreateSession(ctx, SessionRequest{SessionID: "rec", BackingPath: mem, CacheKey: "abc", RecordPages: 1000})
	if err != nil {
		t.Fatal(err)
	}
	c := startConsumer(t, s.SocketPath, mem, 512*uffd.PageSize, "good", script)
	c.expect("waiting")
	rec, err := p.client.Recording(ctx, "rec")
	if err != nil {
		t.Fatal(err)
	}
	want := append(seqPages(100, 200), seqPages(0, 100)...)
	if !slices.Equal(rec.Pages, want) {
		t.Fatalf("recording holds %d pages %v..., want pages 100-199 then 0-99", len(rec.Pages), rec.Pages[:min(10, len(rec.Pages))])
	}
	if rec.Key != "abc" || rec.Source != prefetch.SourceUffd || rec.FileSize != 512*uffd.PageSize || rec.Window <= 0 {
		t.Errorf("recording header %+v", rec)
	}
	if st := p.sessionStats(t, "rec"); st.Prefetch == nil || st.Prefetch.Mode != "record" || st.Prefetch.PagesRecorded != 200 {
		t.Errorf("session prefetch stats %+v, want mode record with 200 pages", st.Prefetch)
	}
	once.Do(func() { close(release) })
	c.resume()
	c.finish()

	t.Run("stops at record_pages", func(t *testing.T) {
		s, err := p.client.CreateSession(ctx, SessionRequest{SessionID: "small", BackingPath: mem, CacheKey: "abc", RecordPages: 50})
		if err != nil {
			t.Fatal(err)
		}
		c := startConsumer(t, s.SocketPath, mem, 512*uffd.PageSize, "good", script)
		c.expect("waiting")
		rec, err := p.client.Recording(ctx, "small")
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(rec.Pages, seqPages(100, 150)) {
			t.Fatalf("recording %v, want the first 50 faults (pages 100-149)", rec.Pages)
		}
		c.resume()
		c.finish()
	})
	t.Run("a session that does not record has no recording", func(t *testing.T) {
		p.create(t, "plain", mem, "abc")
		_, err := p.client.Recording(ctx, "plain")
		var ae *APIError
		if !errors.As(err, &ae) || ae.Status != 409 {
			t.Fatalf("recording of a plain session: %v, want 409", err)
		}
	})
}

// TestReplayInstallsTheWorkingSetSoTheGuestDoesNotFault: a guest that
// touches what was recorded faults only on the probes, uses every one of
// them (no waste), and reads exactly the mem-file's bytes, holes and the
// all-zero page included.
func TestReplayInstallsTheWorkingSetSoTheGuestDoesNotFault(t *testing.T) {
	t.Run("populated", func(t *testing.T) { testReplayInstallsTheWorkingSet(t, Config{CacheBytes: cacheBytes}) })
	// A kernel before 5.14 refuses MADV_POPULATE_READ: the replay's runs
	// fault in from the mapping as they are installed, just as well.
	t.Run("without MADV_POPULATE_READ", func(t *testing.T) {
		testReplayInstallsTheWorkingSet(t, Config{CacheBytes: cacheBytes, noPopulateRead: true})
	})
}

func testReplayInstallsTheWorkingSet(t *testing.T, cfg Config) {
	requireUffd(t)
	p := startPager(t, cfg)
	mem := memFile(t, p.dir, testPages, zeroPage, holeLo, holeHi)
	ctx := context.Background()
	const ws = 2048 // pages 0-2047: data, the zero page and part of the hole

	s, err := p.client.CreateSession(ctx, SessionRequest{SessionID: "rec", BackingPath: mem, CacheKey: "abc", RecordPages: testPages})
	if err != nil {
		t.Fatal(err)
	}
	rc := startConsumer(t, s.SocketPath, mem, testSize, "good", fmt.Sprintf("touch:0-%d,wait", ws))
	rc.expect("waiting")
	rec, err := p.client.Recording(ctx, "rec")
	if err != nil {
		t.Fatal(err)
	}
	rc.resume()
	rc.finish()
	p.waitSessions(t, 0)
	if len(rec.Pages) != ws {
		t.Fatalf("recorded %d pages, want %d", len(rec.Pages), ws)
	}
	if err := prefetch.Write(filepath.Join(p.dir, "abc.ws"), rec); err != nil {
		t.Fatal(err)
	}

	s, err = p.client.CreateSession(ctx, SessionRequest{SessionID: "replay", BackingPath: mem, CacheKey: "abc", PrefetchPath: filepath.Join(p.dir, "abc.ws")})
	if err != nil {
		t.Fatal(err)
	}
	c := startConsumer(t, s.SocketPath, mem, testSize, "good", fmt.Sprintf("wait,touch:0-%d,wait", ws))
	c.expect("waiting")
	waitFor(t, "replay to finish", func() bool { return p.sessionStats(t, "replay").Prefetch.Done })
	c.resume()
	c.expect("waiting")
	st := p.sessionStats(t, "replay")
	c.resume()
	c.finish()

	probes := uint64(ws / probeStride(ws))
	pf := st.Prefetch
	if pf.Mode != "replay" || pf.PagesRecorded != ws || pf.Error != "" {
		t.Fatalf("prefetch stats %+v, want a replay of %d pages", pf, ws)
	}
	if st.PrefetchProbes != probes || pf.PagesPrefetched != ws-probes {
		t.Errorf("prefetched %d pages with %d probes, want %d and %d", pf.PagesPrefetched, st.PrefetchProbes, ws-probes, probes)
	}
	if st.PrefetchProbeFaults != probes || pf.PagesWasted != 0 {
		t.Errorf("probe faults %d of %d, wasted %d: want every probe used, no waste", st.PrefetchProbeFaults, probes, pf.PagesWasted)
	}
	// Demand faults: the probes only (a fault can be raised twice when a
	// signal interrupts it), not the 2048 pages of the working set.
	if st.Faults < probes || st.Faults > 2*probes {
		t.Errorf("faults = %d, want about the %d probes", st.Faults, probes)
	}
	if pf.WorkingSetMs <= 0 && !pf.Done {
		t.Errorf("working_set_ms %d, done %v: want both set", pf.WorkingSetMs, pf.Done)
	}
}

// TestReplayOfAnotherWorkingSetNeverGivesWrongData: a guest that writes
// recorded pages before replay reaches them keeps its writes, a guest that
// uses other pages reads the mem-file's bytes there, and the waste estimate
// says the recording was not used.
func TestReplayOfAnotherWorkingSetNeverGivesWrongData(t *testing.T) {
	requireUffd(t)
	hold := make(chan struct{})
	p := startPager(t, Config{CacheBytes: cacheBytes, holdPrefetch: hold})
	mem := memFile(t, p.dir, testPages, zeroPage, holeLo, holeHi)
	order := seqPages(0, 1024)
	slices.Reverse(order)
	path := writeRecording(t, p.dir, "abc", testPages, order)
	s, err := p.client.CreateSession(context.Background(), SessionRequest{SessionID: "vm", BackingPath: mem, CacheKey: "abc", PrefetchPath: path})
	if err != nil {
		t.Fatal(err)
	}
	c := startConsumer(t, s.SocketPath, mem, testSize, "good",
		fmt.Sprintf("write:0-64,wait,written:0-64,touch:2048-%d,wait", testPages))
	c.expect("waiting")
	close(hold)
	waitFor(t, "replay to finish", func() bool { return p.sessionStats(t, "vm").Prefetch.Done })
	c.resume()
	c.expect("waiting")
	st := p.sessionStats(t, "vm")
	c.resume()
	c.finish()
	pf := st.Prefetch
	// 1024 recorded, one in probeStride a probe, 64 written by the guest
	// first (those of them at probe positions are counted once).
	probes, writtenProbes := 0, 0
	for i, page := range order {
		if i%probeStride(len(order)) == 0 {
			probes++
			if page < 64 {
				writtenProbes++
			}
		}
	}
	if want := uint64(1024 - probes - 64 + writtenProbes); pf.PagesPrefetched != want {
		t.Errorf("prefetched %d pages, want %d", pf.PagesPrefetched, want)
	}
	if pf.PagesWasted < pf.PagesPrefetched*28/32 {
		t.Errorf("wasted %d of %d prefetched pages, want nearly all (the guest used only its own pages)", pf.PagesWasted, pf.PagesPrefetched)
	}
}

// TestUnusableRecordingIsNotReplayed: a recording of another key, or a
// damaged one, is refused; the session serves faults as usual and says why.
// The twin is the same recording under its own key, which replays.
func TestUnusableRecordingIsNotReplayed(t *testing.T) {
	requireUffd(t)
	p := startPager(t, Config{CacheBytes: cacheBytes})
	mem := memFile(t, p.dir, 256, -1, 0, 0)
	path := writeRecording(t, p.dir, "abc", 256, seqPages(0, 256))
	damaged := filepath.Join(p.dir, "damaged.ws")
	b, _ := os.ReadFile(path)
	b[len(b)-6] ^= 0xff
	os.WriteFile(damaged, b, 0o600)
	tests := []struct {
		name, key, path, mode, err string
	}{
		{"another key", "def", path, "none", "stale"},
		{"damaged", "abc", damaged, "none", "corrupt"},
		{"twin: its own key", "abc", path, "replay", ""},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := fmt.Sprintf("vm-%d", i)
			s, err := p.client.CreateSession(context.Background(), SessionRequest{SessionID: id, BackingPath: mem, CacheKey: tt.key, PrefetchPath: tt.path})
			if err != nil {
				t.Fatal(err)
			}
			c := startConsumer(t, s.SocketPath, mem, 256*uffd.PageSize, "good", "touch:0-256,wait")
			c.expect("waiting")
			st := p.sessionStats(t, id)
			c.resume()
			c.finish()
			if st.Prefetch == nil || st.Prefetch.Mode != tt.mode || !strings.Contains(st.Prefetch.Error, tt.err) {
				t.Fatalf("prefetch stats %+v, want mode %q with an error mentioning %q", st.Prefetch, tt.mode, tt.err)
			}
		})
	}
}

// TestReplayOf4KiBPagesCachesOnlyItsProbes: every replay of 4 KiB pages,
// lone or beside siblings of its key, installs its working set from its
// own mapping of the mem-file (the kernel's page cache) and puts only its
// probes and all-zero markers in the pager's cache: a sibling's lookup of
// every page in the pager's cache and copy of it into a buffer cost more
// than the install. Each replay reads its working set from the mem-file
// (backing_bytes), the siblings' probe faults hit the probes the first
// one cached, and every guest reads the file's bytes (the consumers check
// each page they touch).
func TestReplayOf4KiBPagesCachesOnlyItsProbes(t *testing.T) {
	requireUffd(t)
	p := startPager(t, Config{CacheBytes: cacheBytes})
	mem := memFile(t, p.dir, testPages, zeroPage, holeLo, holeHi)
	const ws = holeLo // pages [0, holeLo): data, and the zero page
	rec := writeRecording(t, p.dir, "abc", testPages, seqPages(0, ws))
	ctx := context.Background()
	probes := uint64((ws + probeStride(ws) - 1) / probeStride(ws))

	var live []*consumer
	for _, id := range []string{"lone", "second", "third"} {
		s, err := p.client.CreateSession(ctx, SessionRequest{SessionID: id, BackingPath: mem, CacheKey: "abc", PrefetchPath: rec})
		if err != nil {
			t.Fatal(err)
		}
		c := startConsumer(t, s.SocketPath, mem, testSize, "good", fmt.Sprintf("wait,touch:0-%d,wait", ws))
		live = append(live, c)
		c.expect("waiting")
		waitFor(t, id+"'s replay to finish", func() bool { return p.sessionStats(t, id).Prefetch.Done })
		c.resume()
		c.expect("waiting")
		st := p.sessionStats(t, id)
		if st.Prefetch.Error != "" || st.Prefetch.PagesPrefetched != ws-probes {
			t.Errorf("%s: prefetched %d pages (error %q), want %d", id, st.Prefetch.PagesPrefetched, st.Prefetch.Error, ws-probes)
		}
		if st.BackingBytes != ws*uffd.PageSize {
			t.Errorf("%s read %d bytes of the mem-file, want its working set's %d (installed from its mapping)", id, st.BackingBytes, ws*uffd.PageSize)
		}
		// The probes and the all-zero page's marker, whatever the siblings.
		if n := uint64(p.stats(t).CacheEntries); n > probes+1 {
			t.Errorf("after %s's replay the pager's cache holds %d pages, want its %d probes and the zero marker", id, n, probes)
		}
		if id != "lone" && (st.Misses != 0 || st.Hits < probes) {
			t.Errorf("%s: %d hits, %d misses; want its %d probe faults served from the probes the first replay cached", id, st.Hits, st.Misses, probes)
		}
	}
	for _, c := range live {
		c.resume()
		c.finish()
	}
}

// TestReadMappedTurnsAFaultIntoAnError: a read of a mapped file past its
// end (the file shrank under the mapping) is an error for the one replay
// that read it, not a SIGBUS that kills the pager. With the guard off the
// read kills this test binary.
func TestReadMappedTurnsAFaultIntoAnError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mem")
	if err := os.WriteFile(path, bytes.Repeat([]byte{7}, 4*uffd.PageSize), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, 4*uffd.PageSize, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	var sum byte
	if err := readMapped(func() { sum = m[3*uffd.PageSize] }); err != nil || sum != 7 {
		t.Fatalf("a read inside the file: %v, %d; want 7", err, sum)
	}
	if err := os.Truncate(path, uffd.PageSize); err != nil {
		t.Fatal(err)
	}
	err = readMapped(func() { sum = m[3*uffd.PageSize] })
	if err == nil || !strings.Contains(err.Error(), "faulted") {
		t.Fatalf("a read past the shrunk file's end: %v; want a fault turned into an error", err)
	}
	// Anything else that panics is not the file's doing: it still panics.
	defer func() {
		if recover() == nil {
			t.Error("a panic that is not a fault was swallowed")
		}
	}()
	readMapped(func() { panic("a bug") })
}

// TestReplayOfAShrunkMemFileStopsReplayOnly: a mem-file cut short under a
// replaying session (it never is; this is the guard) stops its replay with
// an error that names the file, and the pager goes on serving the VM's
// faults in what is left.
func TestReplayOfAShrunkMemFileStopsReplayOnly(t *testing.T) {
	requireUffd(t)
	hold := make(chan struct{})
	p := startPager(t, Config{CacheBytes: cacheBytes, holdPrefetch: hold})
	mem := memFile(t, p.dir, 256, -1, 0, 0)
	path := writeRecording(t, p.dir, "abc", 256, seqPages(0, 256))
	s, err := p.client.CreateSession(context.Background(), SessionRequest{SessionID: "vm", BackingPath: mem, CacheKey: "abc", PrefetchPath: path})
	if err != nil {
		t.Fatal(err)
	}
	c := startConsumer(t, s.SocketPath, mem, 256*uffd.PageSize, "good", "wait,touch:0-16,wait")
	c.expect("waiting")
	if err := os.Truncate(mem, 16*uffd.PageSize); err != nil {
		t.Fatal(err)
	}
	close(hold)
	waitFor(t, "replay to stop", func() bool { return p.sessionStats(t, "vm").Prefetch.Error != "" })
	if e := p.sessionStats(t, "vm").Prefetch.Error; !strings.Contains(e, mem) {
		t.Errorf("replay error %q does not name the mem-file %s", e, mem)
	}
	c.resume()
	c.expect("waiting")
	c.resume()
	c.finish()
}

// TestProbesStayFewAndEnough: a replay's probes sample its working set
// often enough to estimate waste (32 or more from 4,096 pages) and cost
// the guest a bounded number of faults whatever its size (a 1 GiB working
// set at one in probeEvery would fault 2,048 times).
func TestProbesStayFewAndEnough(t *testing.T) {
	for _, n := range []int{1, 127, 128, 129, 1024, 4095, 4096, 8191, 8192, 8193, 10000, 16384, 65536, 262144, 1 << 20, 3<<20 + 7} {
		stride := probeStride(n)
		probes := (n + stride - 1) / stride
		if probes > maxProbes {
			t.Errorf("%d recorded pages: %d probes (one in %d), want at most %d", n, probes, stride, maxProbes)
		}
		if n >= 4096 && probes < 32 {
			t.Errorf("%d recorded pages: %d probes (one in %d), want 32 or more", n, probes, stride)
		}
		if stride < probeEvery {
			t.Errorf("%d recorded pages: one probe in %d, want one in %d at most", n, stride, probeEvery)
		}
	}
}

// TestReplayInstallsACachedPageFromItsEntry: a replay run of one page the
// pager's cache holds (a 2 MiB page a sibling's replay or fault read) is
// installed straight from the cache entry, which is immutable, not from a
// fresh 2 MiB buffer the entry is copied into: 25 sibling replays made 25
// such copies of every page. A run of several cached pages is still copied
// into one buffer (one UFFDIO_COPY for all of them), and a run with a page
// the cache lacks is read.
func TestReplayInstallsACachedPageFromItsEntry(t *testing.T) {
	const ps = uffd.HugePageSize
	s := &session{srv: &Server{cache: newPageCache(256 << 20)}, keyID: 1, data: extents(nil).add(0, 4*ps)}
	entry := make([]byte, ps)
	entry[0] = 1
	s.srv.cache.put(s.pageKey(0, ps), entry, false)
	s.srv.cache.put(s.pageKey(ps, ps), slices.Clone(entry), false)

	one := &pfRun{off: 0, pages: 1, ps: ps}
	if err := s.fillRun(one, nil, nil); err != nil {
		t.Fatal(err)
	}
	if !one.borrowed || &one.buf[0] != &entry[0] {
		t.Errorf("a run of one cached page: borrowed %v, installs from the entry %v; want the entry itself, no copy", one.borrowed, &one.buf[0] == &entry[0])
	}
	two := &pfRun{off: 0, pages: 2, ps: ps}
	if err := s.fillRun(two, nil, nil); err != nil {
		t.Fatal(err)
	}
	if two.borrowed || len(two.buf) != 2*ps || two.buf[0] != 1 || two.buf[ps] != 1 {
		t.Errorf("a run of two cached pages: borrowed %v, %d bytes; want both pages copied into one buffer", two.borrowed, len(two.buf))
	}
	s.srv.putRunBuf(two.buf)
}

// TestANewRecordingOfAKeyIsNeverReplayedFromAStalePlan: the sessions of a
// key share the plan of its recording (decoded and planned once) only
// while their recording file holds the bytes it was made from. A session
// given another recording of the key, in another file or at the same path
// rewritten, while sessions of the old plan are live, replays its own; the
// key's plan is forgotten with its last session. The twin reuses the key's
// plan whatever the file holds, and the checks must catch it.
func TestANewRecordingOfAKeyIsNeverReplayedFromAStalePlan(t *testing.T) {
	requireUffd(t)
	for _, twin := range []bool{false, true} {
		checkTwin(t, twin, stalePlanProblems(t, twin), "with plans reused by key alone")
	}
}

// stalePlanProblems runs TestANewRecordingOfAKeyIsNeverReplayedFromAStalePlan's
// sessions, with plans reused by key alone when twin, and returns what
// its checks found wrong.
func stalePlanProblems(t *testing.T, twin bool) []string {
	p := startPager(t, Config{CacheBytes: cacheBytes, plansByKeyOnly: twin})
	mem := memFile(t, p.dir, testPages, zeroPage, holeLo, holeHi)
	ctx := context.Background()
	var problems []string
	planOf := func(id string) *replayPlan {
		p.srv.mu.Lock()
		defer p.srv.mu.Unlock()
		return p.srv.sessions[id].plan
	}
	replay := func(id, path string, want int) {
		t.Helper()
		if _, err := p.client.CreateSession(ctx, SessionRequest{SessionID: id, BackingPath: mem, CacheKey: "abc", PrefetchPath: path}); err != nil {
			t.Fatal(err)
		}
		pf := p.sessionStats(t, id).Prefetch
		if pf == nil || pf.Mode != "replay" || pf.PagesRecorded != uint64(want) {
			problems = append(problems, fmt.Sprintf("session %s replays %+v, want the %d pages of its recording %s", id, pf, want, path))
		}
	}
	first := writeRecording(t, p.dir, "abc", testPages, seqPages(0, 256))
	replay("a", first, 256)
	replay("a2", first, 256)
	if planOf("a") != planOf("a2") {
		t.Errorf("two sessions of one recording have two plans, want one shared")
	}
	other := filepath.Join(p.dir, "other.ws")
	if err := prefetch.Write(other, prefetch.Recording{Key: "abc", PageSize: uffd.PageSize, FileSize: testSize,
		Source: prefetch.SourceUffd, Window: time.Second, RecordedAt: time.Now(), Pages: seqPages(0, 300)}); err != nil {
		t.Fatal(err)
	}
	replay("b", other, 300)                                        // another file
	writeRecording(t, p.dir, "abc", testPages, seqPages(100, 500)) // the first path rewritten
	replay("c", first, 400)
	for _, id := range []string{"a", "a2", "b", "c"} {
		if err := p.client.DeleteSession(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	p.srv.mu.Lock()
	left := len(p.srv.plans)
	p.srv.mu.Unlock()
	if left != 0 {
		t.Errorf("%d plans kept after the key's last session ended, want none", left)
	}
	return problems
}
