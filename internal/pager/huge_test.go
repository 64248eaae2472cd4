package pager

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/testenv"
	"github.com/forkd/forkd/internal/uffd"
)

// Guest memory backed by 2 MiB hugetlbfs pages (Firecracker's huge_pages
// "2M"): the consumer maps private hugetlb memory, and its handshake
// announces page_size 2097152 for every region. The pager must install
// whole 2 MiB pages (UFFDIO_COPY, zeros as a copy of a zero page), and the
// guest must read exactly the mem-file's bytes.

const (
	perHuge   = uffd.HugePageSize / uffd.PageSize // 4 KiB pages in a 2 MiB page
	hugeCount = 8                                 // 2 MiB pages of guest memory
	hugeSize  = hugeCount * uffd.HugePageSize
	hugeFile  = hugeCount * perHuge // mem-file pages (4 KiB)
	// mixedData is the one data page of the mostly-zero 2 MiB page 2.
	mixedData = 2*perHuge + 300
	// hugeCacheBytes lets every shard of the pager's cache hold 2 MiB
	// pages (a page over a shard's budget, 1/64 of the whole, is never
	// cached).
	hugeCacheBytes = 256 << 20
)

// hugeMemFile writes a mem-file of hugeCount 2 MiB pages, by 2 MiB page:
// 0, 5, 6, 7 data; 1 written as zeros (an all-zero page: zeros without a
// hole); 2 zeros but for its 4 KiB page mixedData; 3 a hole; 4 a hole in
// its first half, data in the second.
func hugeMemFile(t testing.TB, dir string) string {
	t.Helper()
	return memFileOf(t, filepath.Join(dir, "memory-huge"), hugeFile, func(p int) pageFill {
		switch h, in := p/perHuge, p%perHuge; {
		case h == 1, h == 2 && p != mixedData:
			return fillZeros
		case h == 3, h == 4 && in < perHuge/2:
			return fillHole
		}
		return fillData
	})
}

// hugeLayouts are the guest memories the 2 MiB tests run on: one region,
// and two (each its own mapping, the second at mem-file offset 8 MiB).
var hugeLayouts = []struct {
	name string
	mem  guestMemory
}{
	{"one region", huge2M},
	{"two regions", guestMemory{pageSize: uffd.HugePageSize, regions: 2}},
}

// needHugePages grows the host's pool by what n consumers of hugeSize
// guest memory at once take.
func needHugePages(t testing.TB, n int) {
	t.Helper()
	requireUffd(t)
	testenv.HugePages(t, n*hugeCount)
}

// TestHugePagesServeEveryByte: a guest of 2 MiB pages reads the mem-file's
// bytes everywhere: data pages, an all-zero page (installed as a copy of
// a zero page, hugetlbfs has no ZEROPAGE), a mostly-zero page, a hole and
// a half hole; each 2 MiB page faults once whichever 4 KiB of it is
// touched first. Where the page comes from depends on the VM's siblings
// (mapped.go): a lone VM's misses are served straight from the page cache
// through a mapping of the mem-file, not read into the heap nor cached
// (but the all-zero page's marker), a second lone VM likewise; with a
// sibling of the key live, misses go through the pager's cache and the
// next VM is served from it with no read of the mem-file; a lone VM of
// another key with the mem-file out of the page cache reads it off the
// session goroutine (cold reads), through the mapping too.
func TestHugePagesServeEveryByte(t *testing.T) {
	for _, layout := range hugeLayouts {
		t.Run(layout.name, func(t *testing.T) {
			needHugePages(t, 1)
			p := startPager(t, Config{CacheBytes: hugeCacheBytes})
			mem := hugeMemFile(t, p.dir)
			checkHugeServing(t, p, mem, layout.mem, false)
		})
	}
	// A kernel before 5.14 refuses MADV_POPULATE_READ: mapped faults read
	// their pages by faulting them in, with every byte and count the same.
	t.Run("without MADV_POPULATE_READ", func(t *testing.T) {
		needHugePages(t, 1)
		p := startPager(t, Config{CacheBytes: hugeCacheBytes, noPopulateRead: true})
		mem := hugeMemFile(t, p.dir)
		checkHugeServing(t, p, mem, huge2M, false)
	})
	// The twin: lone VMs' misses read into the heap and cached, as before
	// mapped faults; the checks of a lone VM's counts must catch it.
	t.Run("twin: misses through the heap", func(t *testing.T) {
		needHugePages(t, 1)
		p := startPager(t, Config{CacheBytes: hugeCacheBytes, noMappedFaults: true})
		mem := hugeMemFile(t, p.dir)
		checkHugeServing(t, p, mem, huge2M, true)
	})
}

// checkHugeServing runs TestHugePagesServeEveryByte's VMs in turn; twin:
// the lone VMs' checks must fail (and are reported as failures if not).
func checkHugeServing(t *testing.T, p *testPager, mem string, gm guestMemory, twin bool) {
	active := 0 // sessions left live: the sibling
	run := func(id, key, script string) SessionInfo {
		t.Helper()
		s := p.create(t, id, mem, key)
		c := startConsumer(t, s.SocketPath, mem, hugeSize, "good", script+fmt.Sprintf("touch:0-%d,wait", hugeFile), gm)
		c.expect("waiting")
		st := p.sessionStats(t, id)
		c.resume()
		c.finish()
		p.waitSessions(t, active)
		return st
	}
	// 2 MiB pages read from the mem-file: all but the hole (3).
	const read = hugeCount - 1
	var lone []string // what the lone VMs' checks found wrong
	loneErrorf := func(format string, args ...any) { lone = append(lone, fmt.Sprintf(format, args...)) }

	first := run("first", "abc", "")
	if first.Faults < hugeCount || first.Faults > 2*hugeCount {
		t.Errorf("faults = %d, want about one per 2 MiB page (%d)", first.Faults, hugeCount)
	}
	if first.Misses != read || first.Hits != 0 || first.BackingBytes != read*uffd.HugePageSize {
		t.Errorf("misses %d, hits %d, read %d bytes; want %d misses reading %d bytes", first.Misses, first.Hits,
			first.BackingBytes, read, read*uffd.HugePageSize)
	}
	// Pages 1 (read back all-zero) and 3 (a hole), in 4 KiB pages.
	if first.ZeroPages != 2*perHuge {
		t.Errorf("zero pages = %d, want %d (2 MiB pages 1 and 3, counted in 4 KiB pages)", first.ZeroPages, 2*perHuge)
	}
	if first.Regions != max(gm.regions, 1) || first.MemoryBytes != hugeSize {
		t.Errorf("session has %d regions of %d bytes, want %d of %d", first.Regions, first.MemoryBytes, max(gm.regions, 1), hugeSize)
	}
	if first.MappedFaults != read || first.ColdReads != 0 {
		loneErrorf("a lone VM: %d mapped faults, %d cold reads; want its %d misses served from the page cache through the mapping", first.MappedFaults, first.ColdReads, read)
	}
	// A lone VM caches only the all-zero marker of page 1: no 2 MiB copy.
	if st := p.stats(t); st.CacheEntries != 1 || st.CacheBytes != entryOverhead {
		loneErrorf("cache after a lone VM: %d entries, %d bytes; want only page 1's all-zero marker", st.CacheEntries, st.CacheBytes)
	}
	second := run("second", "abc", "")
	if second.Hits != 1 || second.Misses != read-1 || second.MappedFaults != read-1 {
		loneErrorf("a second lone VM: %d hits, %d misses, %d mapped; want the zero marker's hit and %d mapped misses", second.Hits, second.Misses, second.MappedFaults, read-1)
	}

	// A sibling of the key live (never connected): misses go through the
	// pager's cache, each 2 MiB page one entry of its size, and the next
	// VM of the key reads nothing.
	if _, err := p.client.CreateSession(context.Background(), SessionRequest{SessionID: "sibling", BackingPath: mem, CacheKey: "abc"}); err != nil {
		t.Fatal(err)
	}
	active = 1
	shared := run("shared", "abc", "")
	if shared.MappedFaults != 0 || shared.Hits+shared.Misses != read {
		t.Errorf("a VM with a sibling: %d mapped faults, %d hits, %d misses; want its %d lookups through the cache", shared.MappedFaults, shared.Hits, shared.Misses, read)
	}
	if st := p.stats(t); st.CacheEntries != read || st.CacheBytes != (read-1)*(uffd.HugePageSize+entryOverhead)+entryOverhead {
		t.Errorf("cache: %d entries, %d bytes; want %d entries, %d bytes", st.CacheEntries, st.CacheBytes, read, (read-1)*(uffd.HugePageSize+entryOverhead)+entryOverhead)
	}
	warm := run("warm", "abc", "")
	if warm.BackingBytes != 0 || warm.Hits != read || warm.Misses != 0 {
		t.Errorf("a VM of the key after the cache has it: %d hits, %d misses, read %d bytes; want %d hits and no read", warm.Hits, warm.Misses, warm.BackingBytes, read)
	}
	if err := p.client.DeleteSession(context.Background(), "sibling"); err != nil {
		t.Fatal(err)
	}
	active = 0
	p.waitSessions(t, 0)

	cold := run("cold", "def", "cold:0-0,")
	if cold.ColdReads == 0 || cold.Misses != read {
		t.Errorf("a VM of a new key with the mem-file dropped: %d cold reads, %d misses; want its %d reads, some off the session goroutine",
			cold.ColdReads, cold.Misses, read)
	}
	if cold.MappedFaults != read {
		loneErrorf("a lone VM of a new key, mem-file dropped: %d mapped faults, want %d (cold reads through the mapping too)", cold.MappedFaults, read)
	}
	checkTwin(t, twin, lone, "with mapped faults off")
}

// TestHugePagesBeyondTheCacheAreServedAndSaidSo: with a cache whose shards
// (1/64 of its budget each) cannot hold a 2 MiB page, every page is still
// served right, none is cached but all-zero markers, and the session says
// why in the log.
func TestHugePagesBeyondTheCacheAreServedAndSaidSo(t *testing.T) {
	needHugePages(t, 1)
	p := startPager(t, Config{CacheBytes: 64 << 20})
	mem := hugeMemFile(t, p.dir)
	s := p.create(t, "vm", mem, "abc")
	c := startConsumer(t, s.SocketPath, mem, hugeSize, "good", fmt.Sprintf("touch:0-%d,wait", hugeFile), huge2M)
	c.expect("waiting")
	c.resume()
	c.finish()
	if st := p.stats(t); st.CacheEntries != 1 || st.CacheBytes != entryOverhead {
		t.Errorf("cache: %d entries, %d bytes; want only page 1's all-zero marker", st.CacheEntries, st.CacheBytes)
	}
	if !strings.Contains(p.logs.String(), "too small to hold this VM's pages") {
		t.Errorf("no warning that the cache cannot hold 2 MiB pages; log:\n%s", p.logs.String())
	}
}

// hugeRange is the script steps' range of mem-file pages (4 KiB) of the
// 2 MiB pages [lo, hi).
func hugeRange(lo, hi int) string { return fmt.Sprintf("%d-%d", lo*perHuge, hi*perHuge) }

// TestHugePageReplayInstallsWholeHugePages: a session of 2 MiB pages
// records each first fault as the 512 4 KiB pages of its 2 MiB page, in
// fault order; a replay of that recording installs the 2 MiB pages but
// its probes (one in probeStride of the recording's 2 MiB pages, not of
// its 4 KiB pages), so the guest faults only on the probes, reads exactly
// the mem-file, and the stats count 4 KiB pages: recorded, prefetched and
// wasted alike. Replay reads each 2 MiB page once.
func TestHugePageReplayInstallsWholeHugePages(t *testing.T) {
	type layoutRun struct {
		name       string
		mem        guestMemory
		noPopulate bool // as a kernel before 5.14 (populateRead)
	}
	var runs []layoutRun
	for _, l := range hugeLayouts {
		runs = append(runs, layoutRun{name: l.name, mem: l.mem})
	}
	runs = append(runs, layoutRun{name: "one region, without MADV_POPULATE_READ", mem: huge2M, noPopulate: true})
	for _, layout := range runs {
		t.Run(layout.name, func(t *testing.T) {
			needHugePages(t, 2)
			p := startPager(t, Config{CacheBytes: hugeCacheBytes, noPopulateRead: layout.noPopulate})
			mem := hugeMemFile(t, p.dir)
			ctx := context.Background()
			// 2 MiB pages 5, 0, 2 (the mixed one), 4 (the half hole), 1 (all zeros)
			// first touched in that order, by a few 4 KiB pages each.
			order := []int{5, 0, 2, 4, 1}
			var script []string
			for _, h := range order {
				script = append(script, fmt.Sprintf("seq:%d-%d", h*perHuge+100, h*perHuge+110))
			}
			s, err := p.client.CreateSession(ctx, SessionRequest{SessionID: "rec", BackingPath: mem, CacheKey: "abc", RecordPages: hugeFile})
			if err != nil {
				t.Fatal(err)
			}
			rc := startConsumer(t, s.SocketPath, mem, hugeSize, "good", strings.Join(script, ",")+",wait", layout.mem)
			rc.expect("waiting")
			rec, err := p.client.Recording(ctx, "rec")
			if err != nil {
				t.Fatal(err)
			}
			rc.resume()
			rc.finish()
			var want []uint64
			for _, h := range order {
				want = append(want, seqPages(uint64(h*perHuge), uint64((h+1)*perHuge))...)
			}
			if !slices.Equal(rec.Pages, want) {
				t.Fatalf("recording of %d pages starts %v, want the 4 KiB pages of 2 MiB pages %v in that order", len(rec.Pages), rec.Pages[:min(4, len(rec.Pages))], order)
			}
			if rec.PageSize != uffd.PageSize || rec.FileSize != hugeFile*uffd.PageSize {
				t.Errorf("recording header: page size %d, file size %d; want 4 KiB pages of a %d-byte file", rec.PageSize, rec.FileSize, hugeFile*uffd.PageSize)
			}
			// Replayed under a key of its own (a copy of the snapshot): the
			// recording session's faults filled the pager's cache for "abc",
			// and this replay must read the mem-file.
			rec.Key = "def"
			path := filepath.Join(p.dir, "def.ws")
			if err := prefetch.Write(path, rec); err != nil {
				t.Fatal(err)
			}

			cached := p.stats(t)
			s, err = p.client.CreateSession(ctx, SessionRequest{SessionID: "replay", BackingPath: mem, CacheKey: "def", PrefetchPath: path})
			if err != nil {
				t.Fatal(err)
			}
			touch := make([]string, len(order))
			for i, h := range order {
				touch[i] = "touch:" + hugeRange(h, h+1)
			}
			c := startConsumer(t, s.SocketPath, mem, hugeSize, "good", "wait,"+strings.Join(touch, ",")+",wait", layout.mem)
			c.expect("waiting")
			waitFor(t, "replay to finish", func() bool { return p.sessionStats(t, "replay").Prefetch.Done })
			c.resume()
			c.expect("waiting")
			st := p.sessionStats(t, "replay")
			c.resume()
			c.finish()

			// One probe (probeStride(5) is 128): the first 2 MiB page, 5.
			const probes = 1
			pf := st.Prefetch
			if pf.Mode != "replay" || pf.PagesRecorded != uint64(len(want)) || pf.Error != "" {
				t.Fatalf("prefetch stats %+v, want a replay of %d pages", pf, len(want))
			}
			if st.PrefetchProbes != probes || pf.PagesPrefetched != (uint64(len(order))-probes)*perHuge {
				t.Errorf("prefetched %d 4 KiB pages with %d probes, want %d (%d 2 MiB pages) and %d",
					pf.PagesPrefetched, st.PrefetchProbes, (len(order)-probes)*perHuge, len(order)-probes, probes)
			}
			if st.PrefetchedPages != pf.PagesPrefetched {
				t.Errorf("counter prefetched_pages %d, prefetch.pages_prefetched %d: want one figure", st.PrefetchedPages, pf.PagesPrefetched)
			}
			if st.PrefetchProbeFaults != probes || pf.PagesWasted != 0 {
				t.Errorf("probe faults %d of %d, wasted %d: want every probe used, no waste", st.PrefetchProbeFaults, probes, pf.PagesWasted)
			}
			if st.Faults < probes || st.Faults > 2*probes {
				t.Errorf("faults = %d, want about the %d probe(s), not one per 2 MiB page touched", st.Faults, probes)
			}
			// A lone replay caches its probe (a 2 MiB page) and the all-zero
			// marker of page 1, nothing else: no 2 MiB copy of every page.
			if now := p.stats(t); now.CacheEntries-cached.CacheEntries != 2 || now.CacheBytes-cached.CacheBytes != uffd.HugePageSize+2*entryOverhead {
				t.Errorf("the replay added %d cache entries, %d bytes; want its probe and one zero marker (2, %d bytes)",
					now.CacheEntries-cached.CacheEntries, now.CacheBytes-cached.CacheBytes, uffd.HugePageSize+2*entryOverhead)
			}
			// Replay reads each 2 MiB page once (the probe too: it caches
			// it for the probe's fault), however many runs of 4 KiB pages
			// the recording holds of it.
			if want := uint64(len(order)) * uffd.HugePageSize; st.BackingBytes != want || st.Hits != probes {
				t.Errorf("read %d bytes of the mem-file, %d cache hits; want %d (each 2 MiB page once) and the probe's hit", st.BackingBytes, st.Hits, want)
			}
		})
	}
}

// TestHugePageFaultAndReplayInstallOnePage: a guest thread faults a 2 MiB
// page whose read is held (a cold read); meanwhile replay installs that
// page, which wakes the thread with the mem-file's bytes; when the held
// read is done its install finds the page present (EEXIST), which is
// success: the session goes on serving and nothing is installed twice.
func TestHugePageFaultAndReplayInstallOnePage(t *testing.T) {
	needHugePages(t, 1)
	const race = 6 // the 2 MiB page both install
	hold := newHoldRead(t, race*perHuge)
	holdReplay := make(chan struct{})
	p := startPager(t, Config{CacheBytes: hugeCacheBytes, beforeRead: hold.hook, holdPrefetch: holdReplay})
	mem := hugeMemFile(t, p.dir)
	// The recording: 2 MiB pages 0 (the probe), 6 and 7.
	ws := append(seqPages(0, perHuge), seqPages(race*perHuge, 8*perHuge)...)
	path := writeRecording(t, p.dir, "abc", hugeFile, ws)
	s, err := p.client.CreateSession(context.Background(), SessionRequest{SessionID: "vm", BackingPath: mem, CacheKey: "abc", PrefetchPath: path})
	if err != nil {
		t.Fatal(err)
	}
	// The session's read-ahead brings the working set into the page cache;
	// once it has, the consumer drops one 4 KiB page of page 6 again, so
	// the fault's read of the 2 MiB page must wait on the disk.
	waitFor(t, "the read-ahead of the working set", func() bool { return residentPages(t, mem, race*perHuge, 8*perHuge) == 2*perHuge })
	c := startConsumer(t, s.SocketPath, mem, hugeSize, "good",
		fmt.Sprintf("cold:%d-%d,bg:seq:%d-%d,wait,touch:%s,bgwait,wait", race*perHuge+7, race*perHuge+8, race*perHuge+7, race*perHuge+8, hugeRange(race, race+1)), huge2M)
	c.expect("waiting")
	hold.waitEntered(t)
	close(holdReplay)
	waitFor(t, "replay to finish while the fault's read is held", func() bool { return p.sessionStats(t, "vm").Prefetch.Done })
	c.resume()
	c.expect("bg done") // replay's install woke the faulting thread
	held := p.sessionStats(t, "vm")
	hold.free()
	waitFor(t, "the held read's install", func() bool { return p.sessionStats(t, "vm").CopyErrors["EEXIST"] >= 1 })
	c.expect("waiting")
	st := p.sessionStats(t, "vm")
	c.resume()
	c.finish()
	if held.ColdReads != 1 || held.PrefetchedPages != 2*perHuge {
		t.Errorf("while the read was held: %d cold reads, %d pages prefetched; want 1 and pages 6 and 7 (%d)", held.ColdReads, held.PrefetchedPages, 2*perHuge)
	}
	if st.CopyErrors["EEXIST"] != 1 || st.PrefetchedPages != held.PrefetchedPages {
		t.Errorf("copy errors %v, %d pages prefetched; want the one EEXIST of the held read, nothing more installed", st.CopyErrors, st.PrefetchedPages)
	}
}

// residentPages counts the 4 KiB pages [lo, hi) of the file at path in
// the page cache.
func residentPages(t testing.TB, path string, lo, hi uint64) uint64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := prefetch.OpenResidency(f)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Close()
	in, _, err := res.Count([]prefetch.Run{{Page: lo, Pages: hi - lo}})
	if err != nil {
		t.Fatal(err)
	}
	return in
}

// TestOneKeyAtTwoPageSizesNeverGivesWrongData: the cache key names the
// content, not the page size, and Firecracker never changes a snapshot's
// page size; still, a key served at 4 KiB and at 2 MiB pages, or a
// recording made at one size replayed at the other, or one whose pages are
// counted in 2 MiB, must never give a guest wrong bytes, and a recording
// still saves the faults it can. The first case is the pager's cache: a
// 4 KiB all-zero marker at a 2 MiB boundary (the start of the mostly-zero
// page 2) is not a zero 2 MiB page.
func TestOneKeyAtTwoPageSizesNeverGivesWrongData(t *testing.T) {
	needHugePages(t, 1)
	p := startPager(t, Config{CacheBytes: hugeCacheBytes})
	mem := hugeMemFile(t, p.dir)
	ctx := context.Background()
	small := guestMemory{pageSize: uffd.PageSize}
	type result struct {
		st  SessionInfo
		rec prefetch.Recording
	}
	// run serves one consumer of key at the given memory, which runs
	// script once the session's replay (if any) is done, and returns its
	// session's stats (and recording, if it records).
	run := func(t *testing.T, id, key string, m guestMemory, req SessionRequest, script string) result {
		t.Helper()
		req.SessionID, req.BackingPath, req.CacheKey = id, mem, key
		s, err := p.client.CreateSession(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		c := startConsumer(t, s.SocketPath, mem, hugeSize, "good", "wait,"+script+",wait", m)
		c.expect("waiting")
		if req.PrefetchPath != "" {
			waitFor(t, id+"'s replay to finish", func() bool { return p.sessionStats(t, id).Prefetch.Done })
		}
		c.resume()
		c.expect("waiting")
		var r result
		if req.RecordPages > 0 {
			rec, err := p.client.Recording(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			r.rec = rec
		}
		r.st = p.sessionStats(t, id)
		c.resume()
		c.finish()
		p.waitSessions(t, 0)
		return r
	}

	t.Run("cache", func(t *testing.T) {
		run(t, "small", "mixed", small, SessionRequest{}, fmt.Sprintf("seq:%d-%d", 2*perHuge, 2*perHuge+1))
		got := run(t, "huge", "mixed", huge2M, SessionRequest{}, "touch:"+hugeRange(2, 3))
		if got.st.ZeroPages != 0 {
			t.Errorf("the mostly-zero 2 MiB page went in as %d zero pages", got.st.ZeroPages)
		}
	})

	// Pages 5 and 0 of 2 MiB, first touched at 4 KiB by pages 2600-2619 and 0-9.
	script4K := "seq:2600-2620,seq:0-10"
	touchBoth := "touch:" + hugeRange(5, 6) + ",touch:" + hugeRange(0, 1)
	t.Run("4 KiB recording, 2 MiB replay", func(t *testing.T) {
		rec := run(t, "rec4k", "a", small, SessionRequest{RecordPages: hugeFile}, script4K).rec
		if len(rec.Pages) != 30 {
			t.Fatalf("recorded %d pages, want 30", len(rec.Pages))
		}
		path := filepath.Join(p.dir, "a.ws")
		if err := prefetch.Write(path, rec); err != nil {
			t.Fatal(err)
		}
		st := run(t, "replay2m", "a", huge2M, SessionRequest{PrefetchPath: path}, touchBoth).st
		// Two 2 MiB pages, the first (5) a probe: page 0 installed whole.
		if st.PrefetchedPages != perHuge || st.PrefetchProbes != 1 || st.Faults > 2 {
			t.Errorf("prefetched %d pages, %d probes, %d faults; want page 0's %d, one probe (page 5) and its fault", st.PrefetchedPages, st.PrefetchProbes, st.Faults, perHuge)
		}
	})
	t.Run("2 MiB recording, 4 KiB replay", func(t *testing.T) {
		rec := run(t, "rec2m", "b", huge2M, SessionRequest{RecordPages: hugeFile}, script4K).rec
		if len(rec.Pages) != 2*perHuge {
			t.Fatalf("recorded %d pages, want the %d of two 2 MiB pages", len(rec.Pages), 2*perHuge)
		}
		path := filepath.Join(p.dir, "b.ws")
		if err := prefetch.Write(path, rec); err != nil {
			t.Fatal(err)
		}
		st := run(t, "replay4k", "b", small, SessionRequest{PrefetchPath: path}, touchBoth).st
		probes := uint64((2*perHuge + probeStride(2*perHuge) - 1) / probeStride(2*perHuge))
		if st.PrefetchedPages != 2*perHuge-probes || st.Faults > 2*probes {
			t.Errorf("prefetched %d pages, %d faults; want %d and about the %d probes", st.PrefetchedPages, st.Faults, 2*perHuge-probes, probes)
		}
	})
	// A recording that counts its pages in 2 MiB: pages 5 and 0.
	path := filepath.Join(p.dir, "c.ws")
	err := prefetch.Write(path, prefetch.Recording{Key: "c", PageSize: uffd.HugePageSize, FileSize: hugeFile * uffd.PageSize,
		Source: prefetch.SourceUffd, Window: time.Second, RecordedAt: time.Now(), Pages: []uint64{5, 0}})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []guestMemory{small, huge2M} {
		t.Run(fmt.Sprintf("recording of 2 MiB pages, %d-byte replay", m.pageSize), func(t *testing.T) {
			st := run(t, fmt.Sprintf("replay-%d", m.pageSize), "c", m, SessionRequest{PrefetchPath: path}, touchBoth).st
			if st.Prefetch.PagesRecorded != 2*perHuge || st.PrefetchedPages+st.PrefetchProbes*uint64(m.pageSize/uffd.PageSize) != 2*perHuge {
				t.Errorf("replay of %d recorded pages prefetched %d with %d probes; want all %d 4 KiB pages of 2 MiB pages 5 and 0",
					st.Prefetch.PagesRecorded, st.PrefetchedPages, st.PrefetchProbes, 2*perHuge)
			}
		})
	}
}

// TestHugePageDiscards: Firecracker refuses a balloon with huge pages, so a
// REMOVE never comes from it; if one does, the pager stays safe. A
// discarded 2 MiB page reads as zeros, written or not, at its next fault
// and from replay (which skips it). A discard of part of a 2 MiB page
// frees nothing (the kernel frees whole huge pages only: it rounds the
// end down), so the page keeps the mem-file's bytes, all of them.
func TestHugePageDiscards(t *testing.T) {
	needHugePages(t, 1)
	hold := make(chan struct{})
	p := startPager(t, Config{CacheBytes: hugeCacheBytes, holdPrefetch: hold})
	mem := hugeMemFile(t, p.dir)
	path := writeRecording(t, p.dir, "abc", hugeFile, seqPages(0, hugeFile))
	s, err := p.client.CreateSession(context.Background(), SessionRequest{SessionID: "vm", BackingPath: mem, CacheKey: "abc", PrefetchPath: path})
	if err != nil {
		t.Fatal(err)
	}
	// 2 MiB page 0: read, written, discarded whole; page 5: never touched,
	// discarded whole; page 6: never touched, its first 4 KiB discarded;
	// page 7: never touched, 2 MiB discarded from its second 4 KiB page.
	c := startConsumer(t, s.SocketPath, mem, hugeSize, "good", strings.Join([]string{
		"touch:" + hugeRange(0, 1), "write:" + hugeRange(0, 1), "dontneed:" + hugeRange(0, 1), "dontneed:" + hugeRange(5, 6),
		fmt.Sprintf("dontneed:%d-%d", 6*perHuge, 6*perHuge+1), "wait",
		"zeros:" + hugeRange(0, 1), "zeros:" + hugeRange(5, 6), "touch:" + hugeRange(1, 5), "touch:" + hugeRange(6, 8), "wait"}, ","), huge2M)
	c.expect("waiting")
	close(hold)
	waitFor(t, "replay to finish", func() bool { return p.sessionStats(t, "vm").Prefetch.Done })
	c.resume()
	c.expect("waiting")
	st := p.sessionStats(t, "vm")
	c.resume()
	c.finish()
	if st.Removes != 2 || st.RemovedFaults != 2 {
		t.Errorf("removes %d, faults in removed ranges %d; want 2 and 2 (2 MiB pages 0 and 5)", st.Removes, st.RemovedFaults)
	}
	// Pages 1-4, 6 and 7 installed by replay (page 0, the probe, was
	// installed by its fault before replay began).
	if want := uint64(6 * perHuge); st.PrefetchedPages != want {
		t.Errorf("prefetched %d pages, want %d", st.PrefetchedPages, want)
	}
}

// TestRemoveOfPartOfAHugePageFreesNothingOfIt: the pager's memory of
// discarded ranges is what the kernel freed: whole 2 MiB pages inside a
// REMOVE's range, whichever range it reports (this kernel reports none for
// less than a page, so the consumer test above cannot send a partial one);
// 4 KiB regions take the range as it is. The twin is the range taken as
// reported, which would zero a 2 MiB page the guest kept.
func TestRemoveOfPartOfAHugePageFreesNothingOfIt(t *testing.T) {
	const base, mb2 = 1 << 30, uffd.HugePageSize
	tests := []struct {
		name       string
		ps         uint64
		start, end uint64
		want       extents
	}{
		{"whole 2 MiB pages", mb2, base + mb2, base + 3*mb2, extents{{base + mb2, base + 3*mb2}}},
		{"4 KiB of a 2 MiB page", mb2, base + mb2, base + mb2 + 4096, nil},
		{"a range past a page's end", mb2, base, base + mb2 + 4096, extents{{base, base + mb2}}},
		{"a range from inside a page", mb2, base + 4096, base + 3*mb2, extents{{base + mb2, base + 3*mb2}}},
		{"4 KiB pages as reported", uffd.PageSize, base + 4096, base + 3*4096, extents{{base + 4096, base + 3*4096}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := &handler{regions: []uffd.Region{{BaseHostVirtAddr: base, Size: 8 * mb2, PageSize: tt.ps}}}
			h.applyRemove(tt.start, tt.end)
			if !slices.Equal(h.removed, tt.want) {
				t.Errorf("REMOVE [%#x, %#x) in %d-byte pages: removed %v, want %v", tt.start, tt.end, tt.ps, h.removed, tt.want)
			}
		})
	}
}

// TestHugePagePopulateInstallsEverythingThenUnregisters: populate installs
// every 2 MiB page with data the guest has not faulted, leaves all-zero
// pages, holes and discarded pages to the kernel (which zero-fills them
// once the regions are unregistered), and the guest then reads the
// mem-file's bytes without a fault.
func TestHugePagePopulateInstallsEverythingThenUnregisters(t *testing.T) {
	needHugePages(t, 1)
	p := startPager(t, Config{CacheBytes: hugeCacheBytes})
	mem := hugeMemFile(t, p.dir)
	s := p.create(t, "vm", mem, "snap")
	c := startConsumer(t, s.SocketPath, mem, hugeSize, "good", strings.Join([]string{
		"touch:" + hugeRange(0, 1), "dontneed:" + hugeRange(5, 6), "wait",
		"touch:" + hugeRange(0, 5), "zeros:" + hugeRange(5, 6), "touch:" + hugeRange(6, 8), "wait"}, ","), huge2M)
	c.expect("waiting")
	if err := p.client.Populate(context.Background(), "vm"); err != nil {
		t.Fatal(err)
	}
	before := p.sessionStats(t, "vm")
	c.resume()
	c.expect("waiting")
	after := p.sessionStats(t, "vm")
	c.resume()
	c.finish()
	if before.State != statePopulated || after.Faults != before.Faults {
		t.Errorf("state %q, faults %d then %d; want populated and no fault after", before.State, before.Faults, after.Faults)
	}
	// 2 MiB pages 2, 4, 6 and 7 (0 was faulted, 1 is all zeros, 3 a hole,
	// 5 discarded), in 4 KiB pages.
	if want := uint64(4 * perHuge); before.PopulatedPages != want {
		t.Errorf("populated pages = %d, want %d", before.PopulatedPages, want)
	}
}

// TestMappedFaultOfAShrunkMemFileEndsOnlyItsSession: a mem-file never
// shrinks while a VM uses it, but if one did, a lone VM's 2 MiB fault
// past its new end, served through the mapping (mapped.go), must end that
// session with a read error naming the file, as a read into a buffer
// does, never fault the pager (SIGBUS) and every VM it serves with it.
func TestMappedFaultOfAShrunkMemFileEndsOnlyItsSession(t *testing.T) {
	needHugePages(t, 1)
	p := startPager(t, Config{CacheBytes: hugeCacheBytes})
	mem := hugeMemFile(t, p.dir)
	s := p.create(t, "vm", mem, "abc")
	c := startConsumer(t, s.SocketPath, mem, hugeSize, "good", "wait,touch:"+hugeRange(5, 6)+",wait", huge2M)
	c.expect("waiting")
	if err := os.Truncate(mem, uffd.HugePageSize); err != nil {
		t.Fatal(err)
	}
	c.resume()
	p.waitSessions(t, 0) // the consumer's thread stays blocked on its uffd; cleanup kills it
	if _, err := p.client.Health(context.Background()); err != nil {
		t.Fatalf("pager after a fault past the mem-file's end: %v", err)
	}
	_, err := p.client.Session(context.Background(), "vm")
	if err == nil || !strings.Contains(err.Error(), mem) {
		t.Errorf("why the session ended: %v; want a read error naming %s", err, mem)
	}
}

// TestMappedFaultWhosePagesLeftMemoryIsServed: a lone VM's 2 MiB fault whose
// window of the mapping is not in memory when it is copied (the page cache
// dropped it after populateRead; here it is never populated) fails that
// copy with ENOMEM; the pager reads the page and installs it from a buffer,
// and the VM gets every byte. The twin ends the session on the ENOMEM, as
// before, and the VM freezes at that fault.
func TestMappedFaultWhosePagesLeftMemoryIsServed(t *testing.T) {
	for _, twin := range []bool{false, true} {
		t.Run(fmt.Sprintf("twin=%v", twin), func(t *testing.T) {
			needHugePages(t, 1)
			p := startPager(t, Config{CacheBytes: hugeCacheBytes, unpopulatedWindows: true, noMappedRetry: twin})
			mem := hugeMemFile(t, p.dir)
			if err := dropPageCache(mem, 0, 0); err != nil {
				t.Fatal(err)
			}
			s := p.create(t, "vm", mem, "abc")
			c := startConsumer(t, s.SocketPath, mem, hugeSize, "good", fmt.Sprintf("touch:0-%d,wait", hugeFile), huge2M)
			if twin {
				if c.printsWithin("waiting", 5*time.Second) {
					t.Fatalf("twin: the VM was served though the session ends on the copy's ENOMEM (the case shows nothing)")
				}
				return
			}
			c.expect("waiting")
			st := p.sessionStats(t, "vm")
			c.resume()
			c.finish()
			if st.CopyErrors["ENOMEM"] == 0 {
				t.Errorf("copy errors %v: want the ENOMEM of a copy from a window not in memory (the case shows nothing)", st.CopyErrors)
			}
		})
	}
}
