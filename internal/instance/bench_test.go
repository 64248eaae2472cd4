package instance

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/network/nettest"
	"github.com/forkd/forkd/internal/testenv"
	"github.com/forkd/forkd/internal/testfs"
)

// BenchmarkForkOfStandby measures the API-level fork of a Standby instance
// per fork strategy and guest RAM size, on an XFS loopback where it can be
// made (root), so reflink runs too. With hardlink the fork never
// touches a mem-file byte, so its cost should be flat in RAM size and far
// below a per-fork copy; compare the sub-benchmarks of one run, never
// absolute times. Copy runs only up to 1 GiB (each op copies the guest's RAM).
//
//	go test -run '^$' -bench ForkOfStandby -benchtime 20x -cpuprofile cpu.pprof ./internal/instance/
func BenchmarkForkOfStandby(b *testing.B) {
	dir := benchDataDir(b)
	for _, tc := range []struct {
		strategy string
		sizes    []int
	}{
		{ForkStrategyHardlink, []int{256, 1024, 4096}},
		{ForkStrategyReflink, []int{256, 1024, 4096}},
		{ForkStrategyCopy, []int{256, 1024}},
	} {
		for _, mib := range tc.sizes {
			b.Run(fmt.Sprintf("strategy=%s/ram=%dMiB", tc.strategy, mib), func(b *testing.B) {
				m := newBenchManager(b, dir, benchSetup{strategy: tc.strategy})
				ctx := context.Background()
				src := benchStandbySource(b, m, mib)
				lat := make([]time.Duration, 0, b.N)
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					t0 := time.Now()
					f, err := m.ForkInstance(ctx, src.ID, api.ForkRequest{Name: fmt.Sprintf("f%d", i)})
					lat = append(lat, time.Since(t0))
					if err != nil {
						b.Fatal(err)
					}
					if f.ForkMode != tc.strategy {
						b.Fatalf("fork_mode %s, want %s", f.ForkMode, tc.strategy)
					}
					// Not timed: delete, so copies do not fill the disk.
					b.StopTimer()
					if err := m.DeleteInstance(ctx, f.ID); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
				// The mean (ns/op) moves with a few slow forks on a noisy
				// host; the p50 is the figure the budgets use.
				slices.Sort(lat)
				b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e6, "p50-ms")
			})
		}
	}
}

// BenchmarkForkBurstOfStandby is BenchmarkForkOfStandby's hardlink fork made
// 25 at a time, as `forkd bench fork-burst` does through the API: one op is a
// burst of 25 concurrent forks of one Standby source. Its profiles show where
// a burst's time goes when the burst p50 is not flat in RAM size:
//
//	go test -run '^$' -bench ForkBurstOfStandby -benchtime 5x -cpuprofile cpu.pprof -trace trace.out ./internal/instance/
//	go tool trace -pprof=syscall trace.out > syscall.pprof
func BenchmarkForkBurstOfStandby(b *testing.B) {
	const forks = 25
	dir := benchDataDir(b)
	for _, mib := range []int{256, 4096} {
		b.Run(fmt.Sprintf("ram=%dMiB", mib), func(b *testing.B) {
			m := newBenchManager(b, dir, benchSetup{})
			ctx := context.Background()
			src := benchStandbySource(b, m, mib)
			var lat []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				ids := make([]string, forks)
				errs := make([]error, forks)
				took := make([]time.Duration, forks)
				var wg sync.WaitGroup
				t0 := time.Now()
				for j := range forks {
					wg.Go(func() {
						f, err := m.ForkInstance(ctx, src.ID, api.ForkRequest{Name: fmt.Sprintf("f%d-%d", i, j)})
						ids[j], errs[j], took[j] = f.ID, err, time.Since(t0)
					})
				}
				wg.Wait()
				b.StopTimer()
				lat = append(lat, took...)
				for j := range forks {
					if errs[j] != nil {
						b.Fatal(errs[j])
					}
					if err := m.DeleteInstance(ctx, ids[j]); err != nil {
						b.Fatal(err)
					}
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*forks)/1e6, "ms/fork")
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e6, "p50-ms")
		})
	}
}

// BenchmarkForkBatchOfStandby is BenchmarkForkBurstOfStandby's 25 forks
// made by one batch call (ForkInstanceBatch) instead of 25 concurrent
// calls: one op is a batch; every fork of it returns when the call does, so
// its p50 is the call's latency.
func BenchmarkForkBatchOfStandby(b *testing.B) {
	const forks = 25
	dir := benchDataDir(b)
	for _, mib := range []int{256, 4096} {
		b.Run(fmt.Sprintf("ram=%dMiB", mib), func(b *testing.B) {
			m := newBenchManager(b, dir, benchSetup{})
			ctx := context.Background()
			src := benchStandbySource(b, m, mib)
			var lat []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				fs, err := m.ForkInstanceBatch(ctx, src.ID, api.ForkBatchRequest{Name: fmt.Sprintf("f%d", i), Count: forks})
				took := time.Since(t0)
				b.StopTimer()
				if err != nil {
					b.Fatal(err)
				}
				if len(fs) != forks {
					b.Fatalf("%d forks, want %d", len(fs), forks)
				}
				lat = append(lat, took)
				for _, f := range fs {
					if err := m.DeleteInstance(ctx, f.ID); err != nil {
						b.Fatal(err)
					}
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*forks)/1e6, "ms/fork")
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e6, "p50-ms")
		})
	}
}

// benchStandbySource is the fork benchmarks' source: a VM of mib MiB named
// src, stood by, with every dirty page written back (sync), so that its
// standby's writeback does not land in the forks' fsyncs.
func benchStandbySource(b *testing.B, m *Manager, mib int) api.Instance {
	b.Helper()
	src, err := m.CreateInstance(context.Background(), api.CreateInstanceRequest{Name: "src", MemoryMiB: mib, BootArgs: "forkd.ws_mib=8 forkd.rate=200"})
	if err != nil {
		b.Fatal(err)
	}
	action(b, m, src.ID, "standby")
	syscall.Sync()
	return src
}

// benchForkTrees is the benchmarks' fork tree pool: fork_tree_pool's
// default (FORKD_BENCH_FORK_TREES overrides it, 0 for none, to measure the
// pool against no pool in one binary).
var benchForkTrees = func() int {
	if n, err := strconv.Atoi(os.Getenv("FORKD_BENCH_FORK_TREES")); err == nil {
		return n
	}
	return 32
}()

// benchDataDir is where the benchmark's managers live: an XFS loopback, so
// every strategy (reflink too) runs on the same filesystem.
func benchDataDir(b *testing.B) string {
	b.Helper()
	return testfs.Mount(b, testfs.XFS, 32<<30).Dir
}

// benchSetup is how a benchmark's manager differs from the plain one
// (jailed, unnetworked, the hardlink fork strategy).
type benchSetup struct {
	strategy string // Config.ForkStrategy ("": hardlink)
	// jailing is "jailed" ("" too), "jailed-copied-exec" (Jail.CopyExec)
	// or "none" (unjailed: vmm_jailer none).
	jailing string
	netNS   string // networked (every VM by default), its daemon side in this namespace
	warm    int    // Config.NetworkWarm, with netNS
}

// newBenchManager is a benchmark's manager on a fresh data dir under
// parent, set up as s says, that logs nothing. The benchmark's end deletes
// every instance it left, drains its pager and closes it.
func newBenchManager(b *testing.B, parent string, s benchSetup) *Manager {
	b.Helper()
	// Short: VMM sockets live under the data dir (108-byte limit).
	dir, err := os.MkdirTemp(parent, "fk")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	cfg := Config{
		DataDir:      dir,
		VMM:          VMMSpec{Binary: forkdBinary(b), Args: testenv.EmulatorArgs(), Emulator: true},
		PagerBinary:  forkdBinary(b),
		Logger:       slog.New(slog.NewTextHandler(io.Discard, nil)),
		ForkStrategy: s.strategy,
		ForkTreePool: benchForkTrees, // the daemon's default
	}
	if s.jailing != "none" {
		cfg.Jail = testJail(b, dir)
		cfg.Jail.CopyExec = s.jailing == "jailed-copied-exec"
	}
	if s.netNS != "" {
		nc, err := network.ParseConfig(nettest.Pool, network.DefaultGuestCIDR, network.DefaultGuestMAC, false, network.Tag(dir))
		if err != nil {
			b.Fatal(err)
		}
		if err := network.Do(s.netNS, func() (err error) { cfg.Network, err = network.New(nc); return err }); err != nil {
			b.Fatal(err)
		}
		cfg.NetworkDefault, cfg.NetworkWarm = true, s.warm
	}
	m, err := New(context.Background(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		list, _ := m.ListInstances(context.Background())
		for _, in := range list {
			m.DeleteInstance(context.Background(), in.ID)
		}
		if hp, ok := m.startedPager().(interface{ Drain(context.Context) error }); ok {
			hp.Drain(context.Background())
		}
		m.Close()
	})
	return m
}

// BenchmarkForkBatchToRunning is a batch of 25 forks of a Standby source
// brought to Running (target_state Running, File restores): one op is the
// batch call, which returns once every fork runs.
//
//	go test -run '^$' -bench ForkBatchToRunning -benchtime 5x ./internal/instance/
func BenchmarkForkBatchToRunning(b *testing.B) {
	const forks = 25
	m := newBenchManager(b, benchDataDir(b), benchSetup{})
	ctx := context.Background()
	src := benchStandbySource(b, m, 256)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		fs, err := m.ForkInstanceBatch(ctx, src.ID, api.ForkBatchRequest{Name: fmt.Sprintf("f%d", i), Count: forks, TargetState: api.StateRunning})
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		for _, f := range fs {
			if f.State != api.StateRunning {
				b.Fatalf("fork %s is %s, want Running", f.Name, f.State)
			}
			if err := m.DeleteInstance(ctx, f.ID); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1e6, "ms/batch")
}
