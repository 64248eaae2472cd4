package pager

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/testenv"
	"github.com/forkd/forkd/internal/uffd"
)

// The fault-serving benchmark (BENCHMARKS.md, "Pager"), in one run:
//
//	RawCopy:            a minimal in-process handler, pread + UFFDIO_COPY per
//	                    fault: the limit of this machine.
//	PagerConsumer/cold: the pager serving a consumer process, empty cache.
//	PagerConsumer/warm: the same with every page cached.
//	TwoConsumersOneKey: a second VM of one cache key after the first.
//
// Every variant touches the 4096 pages of a 16 MiB mem-file in one random
// order and reports ns/fault (the consumer's round trip) and service-ns/fault
// (the handler's time from reading the event to the page installed).
// Compare ratios within one run; this nested VM's absolute times are slow.

const benchPages = testPages

func BenchmarkRawCopy(b *testing.B) {
	requireUffd(b)
	b.Run("in-process", func(b *testing.B) {
		mem := memFile(b, b.TempDir(), benchPages, -1, 0, 0)
		file, err := os.Open(mem)
		if err != nil {
			b.Fatal(err)
		}
		defer file.Close()
		order := rand.New(rand.NewPCG(7, 1)).Perm(benchPages)
		var faults int
		var touch, service time.Duration
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			tt, st, n := rawCopyRun(b, file, order)
			touch += tt
			service += st
			faults += n
		}
		b.ReportMetric(float64(touch.Nanoseconds())/float64(faults), "ns/fault")
		b.ReportMetric(float64(service.Nanoseconds())/float64(faults), "service-ns/fault")
	})
	// The same handler inside a fresh consumer process, as the pager's
	// consumers are: a new process pays this VM's first-touch cost on every
	// page, which the in-process loop (reusing its mapping) does not.
	b.Run("consumer-process", func(b *testing.B) {
		mem := memFile(b, b.TempDir(), benchPages, -1, 0, 0)
		var touch, service time.Duration
		var faults int
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			c := startConsumer(b, "", mem, benchPages*uffd.PageSize, "self", fmt.Sprintf("touch:0-%d", benchPages))
			f := strings.Fields(c.expect("touch_ns"))
			ns, _ := strconv.ParseInt(f[1], 10, 64)
			touch += time.Duration(ns)
			f = strings.Fields(c.expect("service_ns"))
			ns, _ = strconv.ParseInt(f[1], 10, 64)
			n, _ := strconv.Atoi(f[3])
			service += time.Duration(ns)
			faults += n
			c.finish()
		}
		b.ReportMetric(float64(touch.Nanoseconds())/float64(benchPages*b.N), "ns/fault")
		b.ReportMetric(float64(service.Nanoseconds())/float64(max(faults, 1)), "service-ns/fault")
	})
}

// rawCopyRun registers a fresh anonymous region, serves its faults from
// file on one locked thread while another touches every page in order.
func rawCopyRun(b *testing.B, file *os.File, order []int) (touch, service time.Duration, faults int) {
	size := benchPages * uffd.PageSize
	region, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(region)
	// The copy source is mmap'd, never Go heap.
	buf, err := unix.Mmap(-1, 0, uffd.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(buf)
	f, err := uffd.Open(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := f.API(0); err != nil {
		b.Fatal(err)
	}
	base := uint64(uintptr(unsafe.Pointer(&region[0])))
	if _, err := f.Register(base, uint64(size), uffd.RegisterModeMissing); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type result struct {
		service time.Duration
		faults  int
		err     error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var r result
		msgs := make([]uffd.Msg, 64)
		for {
			n, err := f.ReadMsgs(msgs)
			if errors.Is(err, unix.EAGAIN) {
				if err := f.WaitReadable(ctx); err != nil {
					done <- r
					return
				}
				continue
			}
			if err != nil {
				r.err = err
				done <- r
				return
			}
			for _, m := range msgs[:n] {
				t0 := time.Now()
				page := m.Address &^ (uffd.PageSize - 1)
				if _, err := file.ReadAt(buf, int64(page-base)); err != nil {
					r.err = err
				}
				if _, err := f.Copy(uintptr(page), uintptr(unsafe.Pointer(&buf[0])), uffd.PageSize, 0); err != nil && !errors.Is(err, unix.EEXIST) {
					r.err = err
				}
				r.service += time.Since(t0)
				r.faults++
			}
		}
	}()
	touched := make(chan time.Duration, 1)
	sinks := make(chan byte, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var sink byte
		t0 := time.Now()
		for _, p := range order {
			sink += region[p*uffd.PageSize] // the fault
		}
		touched <- time.Since(t0)
		sinks <- sink // a use, so the loads are not dead code
	}()
	touch = <-touched
	<-sinks
	cancel()
	r := <-done
	if r.err != nil {
		b.Fatal(r.err)
	}
	return touch, r.service, r.faults
}

// pagerRun is one consumer process touching every page through the pager;
// it returns the consumer's touch time and the session's counters.
func pagerRun(b *testing.B, p *testPager, mem, id, key string) (time.Duration, SessionInfo) {
	s := p.create(b, id, mem, key)
	c := startConsumer(b, s.SocketPath, mem, benchPages*uffd.PageSize, "good", fmt.Sprintf("touch:0-%d,wait", benchPages))
	line := c.expect("touch_ns")
	ns, _ := strconv.ParseInt(strings.Fields(line)[1], 10, 64)
	c.expect("waiting")
	st := p.sessionStats(b, id)
	c.resume()
	c.finish()
	return time.Duration(ns), st
}

type benchTotals struct {
	touch                time.Duration
	pages                int
	faults, hits, misses uint64
	backing              uint64
	serviceSum           float64 // seconds
	serviceCount         uint64
}

func (t *benchTotals) add(touch time.Duration, st SessionInfo) {
	t.touch += touch
	t.pages += benchPages
	t.faults += st.Faults
	t.hits += st.Hits
	t.misses += st.Misses
	t.backing += st.BackingBytes
	t.serviceSum += st.FaultLatency.SumSeconds
	t.serviceCount += st.FaultLatency.Count
}

func (t *benchTotals) report(b *testing.B) {
	b.ReportMetric(float64(t.touch.Nanoseconds())/float64(t.pages), "ns/fault")
	b.ReportMetric(t.serviceSum*1e9/float64(max(t.serviceCount, 1)), "service-ns/fault")
	b.ReportMetric(float64(t.hits)/float64(max(t.hits+t.misses, 1)), "hit-rate")
	b.ReportMetric(float64(t.backing)/float64(t.pages), "backing-B/page")
}

func BenchmarkPagerConsumer(b *testing.B) {
	requireUffd(b)
	for _, warm := range []bool{false, true} {
		name := map[bool]string{false: "cold", true: "warm"}[warm]
		b.Run(name, func(b *testing.B) {
			p := startPager(b, Config{CacheBytes: 256 << 20})
			mem := memFile(b, p.dir, benchPages, -1, 0, 0)
			if warm {
				pagerRun(b, p, mem, "warmup", "key")
			}
			var tot benchTotals
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				key := "key"
				if !warm {
					key = fmt.Sprintf("cold-%d", i) // an empty cache every run
				}
				tt, st := pagerRun(b, p, mem, fmt.Sprintf("run-%d", i), key)
				tot.add(tt, st)
			}
			tot.report(b)
		})
	}
}

func BenchmarkTwoConsumersOneKey(b *testing.B) {
	requireUffd(b)
	p := startPager(b, Config{CacheBytes: 256 << 20})
	mem := memFile(b, p.dir, benchPages, -1, 0, 0)
	var first, second benchTotals
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		key := fmt.Sprintf("snap-%d", i)
		tt, st := pagerRun(b, p, mem, fmt.Sprintf("first-%d", i), key)
		first.add(tt, st)
		tt, st = pagerRun(b, p, mem, fmt.Sprintf("second-%d", i), key)
		second.add(tt, st)
	}
	second.report(b)
	b.ReportMetric(float64(first.touch)/float64(second.touch), "first/second-time")
}

// BenchmarkCachedFaultsBesideColdReads: a VMM with two threads, one
// faulting pages the disk must bring in (512 random pages of a mem-file
// dropped from the page cache), the other faulting 1,024 pages the pager
// has cached. With the reads done in place (the session goroutine waits
// on each) the cached faults queue behind them; read off the session
// goroutine (coldread.go) they are served at once. Both pagers run in
// turn in every iteration; the metrics are per iteration, in ms.
func BenchmarkCachedFaultsBesideColdReads(b *testing.B) {
	requireUffd(b)
	variants := []struct {
		name string
		sync bool
	}{{"inplace", true}, {"offloaded", false}}
	type pagerOf struct {
		p   *testPager
		mem string
	}
	var ps []pagerOf
	for _, v := range variants {
		p := startPager(b, Config{CacheBytes: 256 << 20, syncColdReads: v.sync})
		ps = append(ps, pagerOf{p, memFile(b, p.dir, benchPages, -1, 0, 0)})
	}
	cached := make([]time.Duration, len(variants))
	cold := make([]time.Duration, len(variants))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for k := range variants {
			j := (k + i) % len(variants) // alternate which goes first
			p, mem := ps[j].p, ps[j].mem
			key := fmt.Sprintf("k-%d", i)
			w := p.create(b, fmt.Sprintf("warm-%d", i), mem, key)
			startConsumer(b, w.SocketPath, mem, benchPages*uffd.PageSize, "good", "seq:0-1024").finish()
			p.waitSessions(b, 0)
			if err := dropPageCache(mem, 0, 0); err != nil {
				b.Fatal(err)
			}
			s := p.create(b, fmt.Sprintf("run-%d", i), mem, key)
			c := startConsumer(b, s.SocketPath, mem, benchPages*uffd.PageSize, "good",
				fmt.Sprintf("cold:2048-%d,bg:touch:2048-2560,seq:0-1024,bgwait", benchPages))
			for range 2 {
				f := strings.Fields(c.expect("touch_ns"))
				ns, _ := strconv.ParseInt(f[1], 10, 64)
				if f[3] == "1024" {
					cached[j] += time.Duration(ns)
				} else {
					cold[j] += time.Duration(ns)
				}
			}
			c.finish()
			p.waitSessions(b, 0)
		}
	}
	for j, v := range variants {
		b.ReportMetric(float64(cached[j].Milliseconds())/float64(b.N), v.name+"-cached-ms")
		b.ReportMetric(float64(cold[j].Milliseconds())/float64(b.N), v.name+"-cold-ms")
	}
	b.ReportMetric(float64(cached[1])/float64(max(cached[0], 1)), "offloaded/inplace-cached")
}

// BenchmarkReplayHugePages (BENCHMARKS.md, "Pager"): a restore whose 64 MiB
// working set is the whole guest memory, at 4 KiB and at 2 MiB pages
// (hugetlb), served by demand faults only and by a replay of a recording of
// every page in ascending order. The consumer touches every 4 KiB page as
// soon as its handshake is sent, as a resumed guest would, in one random
// order, or ("-seq") in the recorded order; the replay starts with the
// session's serving. Per variant, medians of the iterations (every variant
// runs in every iteration, in rotating order):
//
//	<variant>-ws-ms   the consumer's time to have read every page: the
//	                  time to working set, handshake to last page
//	<variant>-cpu-ms  the pager's CPU (this process's user+system) from
//	                  session creation to that point: the UFFDIO_COPYs
//	                  (they copy into the guest) and reads are charged here
//	<variant>-faults  the session's faults
//
// and the ratios 2m/4k of each pair. Fresh hugetlb pages are slow to touch
// the first time on this nested VM (the host backs them then): run enough
// iterations (10x) that the medians are of a warmed pool.
func BenchmarkReplayHugePages(b *testing.B) {
	requireUffd(b)
	const wsPages = 64 << 20 / uffd.PageSize
	testenv.HugePages(b, wsPages/perHuge+8)
	p := startPager(b, Config{CacheBytes: 512 << 20})
	mem := memFileOf(b, filepath.Join(p.dir, "memory-64m"), wsPages, func(int) pageFill { return fillData })
	small := guestMemory{pageSize: uffd.PageSize}
	random, inOrder := fmt.Sprintf("touch:0-%d,wait", wsPages), fmt.Sprintf("seq:0-%d,wait", wsPages)
	variants := []struct {
		name   string
		mem    guestMemory
		replay bool
		script string
	}{
		{"fault-4k", small, false, random},
		{"fault-2m", huge2M, false, random},
		{"replay-4k", small, true, random},
		{"replay-2m", huge2M, true, random},
		{"replay-seq-4k", small, true, inOrder},
		{"replay-seq-2m", huge2M, true, inOrder},
	}
	ws := make([][]float64, len(variants))
	cpu := make([][]float64, len(variants))
	faults := make([][]float64, len(variants))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for k := range variants {
			j := (k + i) % len(variants)
			v := variants[j]
			// A new key every run: the pager's cache starts empty (a lone
			// replay caches only its probes); the mem-file stays in the
			// kernel's page cache (the consumer reads it to verify).
			key := fmt.Sprintf("%08x%04x", i, j) // recordings want hex keys
			req := SessionRequest{SessionID: key, BackingPath: mem, CacheKey: key}
			if v.replay {
				req.PrefetchPath = writeRecording(b, p.dir, key, wsPages, seqPages(0, wsPages))
			}
			cpu0 := processCPU()
			s, err := p.client.CreateSession(context.Background(), req)
			if err != nil {
				b.Fatal(err)
			}
			c := startConsumer(b, s.SocketPath, mem, wsPages*uffd.PageSize, "good", v.script, v.mem)
			f := strings.Fields(c.expect("touch_ns"))
			c.expect("waiting")
			used := processCPU() - cpu0
			ns, _ := strconv.ParseInt(f[1], 10, 64)
			st := p.sessionStats(b, key)
			c.resume()
			c.finish()
			p.waitSessions(b, 0)
			ws[j] = append(ws[j], float64(ns)/1e6)
			cpu[j] = append(cpu[j], float64(used)/1e6)
			faults[j] = append(faults[j], float64(st.Faults))
		}
	}
	b.StopTimer()
	med := make([][3]float64, len(variants))
	for j, v := range variants {
		med[j] = [3]float64{median(ws[j]), median(cpu[j]), median(faults[j])}
		b.ReportMetric(med[j][0], v.name+"-ws-ms")
		b.ReportMetric(med[j][1], v.name+"-cpu-ms")
		b.ReportMetric(med[j][2], v.name+"-faults")
	}
	for _, pair := range [][2]int{{0, 1}, {2, 3}, {4, 5}} {
		name := strings.TrimSuffix(variants[pair[0]].name, "-4k")
		b.ReportMetric(med[pair[1]][0]/med[pair[0]][0], name+"-2m/4k-ws")
		b.ReportMetric(med[pair[1]][1]/med[pair[0]][1], name+"-2m/4k-cpu")
	}
}

// processCPU is this process's user and system CPU time so far.
func processCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if n := len(s); n%2 == 0 {
		return (s[n/2-1] + s[n/2]) / 2
	}
	return s[len(s)/2]
}

// BenchmarkSiblingReplay4K (BENCHMARKS.md, "Pager"): the forks of a burst
// after the first, at 4 KiB pages. Per iteration a new cache key: a first
// VM replays its 64 MiB working set and stays live, then siblings of its
// key replay the same recording one at a time, each while the ones before
// it are live, and touch it in one random order. Medians over the
// siblings of every iteration:
//
//	sibling-cpu-ms   the pager's CPU (this process's user+system) from a
//	                 sibling's session creation to its touch done: its
//	                 planning, reads and installs
//	sibling-ws-ms    the sibling's time to have read every page
//	first-cpu-ms     the same CPU for the first VM of the key
func BenchmarkSiblingReplay4K(b *testing.B) {
	requireUffd(b)
	const wsPages = 64 << 20 / uffd.PageSize
	const siblings = 4
	p := startPager(b, Config{CacheBytes: 512 << 20})
	mem := memFileOf(b, filepath.Join(p.dir, "memory-64m"), wsPages, func(int) pageFill { return fillData })
	script := fmt.Sprintf("wait,touch:0-%d,wait", wsPages)
	var first, cpu, ws []float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		key := fmt.Sprintf("%08x", i)
		path := writeRecording(b, p.dir, key, wsPages, seqPages(0, wsPages))
		var live []*consumer
		for k := 0; k <= siblings; k++ {
			id := fmt.Sprintf("%s-%d", key, k)
			cpu0 := processCPU()
			s, err := p.client.CreateSession(context.Background(), SessionRequest{SessionID: id, BackingPath: mem, CacheKey: key, PrefetchPath: path})
			if err != nil {
				b.Fatal(err)
			}
			c := startConsumer(b, s.SocketPath, mem, wsPages*uffd.PageSize, "good", script)
			live = append(live, c)
			c.expect("waiting")
			c.resume()
			f := strings.Fields(c.expect("touch_ns"))
			c.expect("waiting")
			used := float64(processCPU()-cpu0) / 1e6
			ns, _ := strconv.ParseInt(f[1], 10, 64)
			if k == 0 {
				first = append(first, used)
				continue
			}
			cpu = append(cpu, used)
			ws = append(ws, float64(ns)/1e6)
		}
		for _, c := range live {
			c.resume()
			c.finish()
		}
		p.waitSessions(b, 0)
	}
	b.StopTimer()
	b.ReportMetric(median(cpu), "sibling-cpu-ms")
	b.ReportMetric(median(ws), "sibling-ws-ms")
	b.ReportMetric(median(first), "first-cpu-ms")
}
