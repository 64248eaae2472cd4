package instance

import (
	"context"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/network/nettest"
	"github.com/forkd/forkd/internal/testnet"
)

// BenchmarkNetworkedFork measures what networking adds to a fork of a
// Standby instance, serial and in a burst of 25, without networking, with
// each fork making its network (namespace, TAP, veth, address, routes, NAT
// table) on its path, and with a warm pool, in one run. Budget: networking
// at most doubles a serial fork's p50. Compare the p50s of one run, never
// absolute times:
//
//	go test -run '^$' -bench NetworkedFork -benchtime 25x ./internal/instance/
//
// Every networked manager runs in a namespace the benchmark made. Forks are
// deleted only after each timed loop: a delete's namespace teardown runs
// asynchronously in the kernel and would compete with the next fork.
func BenchmarkNetworkedFork(b *testing.B) {
	dir := benchDataDir(b)
	// net: off; on (each fork makes its network); warm (it takes one the
	// warm pool made ahead; the pool is refilled, untimed, before each fork
	// or burst).
	for _, net := range []string{"off", "on", "warm"} {
		for _, burst := range []int{1, 25} {
			b.Run(fmt.Sprintf("net=%s/burst=%d", net, burst), func(b *testing.B) {
				var s benchSetup
				networked := net != "off"
				if networked {
					s.netNS = nettest.Namespace(b)
				}
				if net == "warm" {
					s.warm = burst
				}
				m := newBenchManager(b, dir, s)
				ctx := context.Background()
				src := benchStandbySource(b, m, 256)
				var lat []time.Duration
				var ids []string
				var mu sync.Mutex
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					waitWarmUntimed(b, m, s.warm)
					var wg sync.WaitGroup
					for j := range burst {
						wg.Go(func() {
							t := time.Now()
							f, err := m.ForkInstance(ctx, src.ID, api.ForkRequest{Name: fmt.Sprintf("f%d-%d", i, j)})
							d := time.Since(t)
							if err != nil {
								b.Error(err)
								return
							}
							if f.Network.Enabled != networked {
								b.Errorf("fork network %+v, want enabled=%v", f.Network, networked)
							}
							mu.Lock()
							lat, ids = append(lat, d), append(ids, f.ID)
							mu.Unlock()
						})
					}
					wg.Wait()
					if burst > 1 { // a burst's forks go before the next burst
						b.StopTimer()
						for _, id := range ids {
							m.DeleteInstance(ctx, id)
						}
						ids = ids[:0]
						b.StartTimer()
					}
				}
				b.StopTimer()
				for _, id := range ids {
					m.DeleteInstance(ctx, id)
				}
				slices.Sort(lat)
				b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
				b.ReportMetric(float64(lat[len(lat)*95/100].Microseconds())/1000, "p95-ms")
			})
		}
	}
}

// BenchmarkFirstAnswer measures, per restore backend, the time from a
// fork call (of a networked snapshot, target Running) to the first TCP
// answer at the fork's address (connect and one echo on port 7), against
// the fork call's own time to Running, over 25 forks one at a time. Budget:
// first-answer p95 within 1.2x of the call's p95 (nothing waits on the
// guest once the restore returns):
//
//	go test -run '^$' -bench FirstAnswer -benchtime 1x ./internal/instance/
func BenchmarkFirstAnswer(b *testing.B) {
	const forks = 25
	for _, backend := range []string{api.BackendFile, api.BackendUffd} {
		b.Run("backend="+backend, func(b *testing.B) {
			tn := testnet.New(b)
			m := newBenchManager(b, "", benchSetup{netNS: tn.Path}) // short paths: the pager's session sockets live under the data dir
			ctx := context.Background()
			if _, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "src", MemoryMiB: 256, BootArgs: "forkd.ws_mib=8 forkd.rate=200"}); err != nil {
				b.Fatal(err)
			}
			if _, err := m.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "snap"}); err != nil {
				b.Fatal(err)
			}
			var call, answer []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				for j := range forks {
					t0 := time.Now()
					f, err := m.ForkSnapshot(ctx, "snap", api.ForkRequest{Name: fmt.Sprintf("f%d-%d", i, j), TargetState: api.StateRunning, RestoreBackend: backend})
					if err != nil {
						b.Fatal(err)
					}
					t1 := time.Now()
					if err := echoOnce(ctx, tn, f.Network.Address); err != nil {
						b.Fatalf("%s: first TCP answer: %v", f.Name, err)
					}
					call, answer = append(call, t1.Sub(t0)), append(answer, time.Since(t0))
				}
				b.StopTimer()
				list, _ := m.ListInstances(ctx)
				for _, in := range list {
					if in.Name != "src" {
						m.DeleteInstance(ctx, in.ID)
					}
				}
				b.StartTimer()
			}
			slices.Sort(call)
			slices.Sort(answer)
			pc := func(d []time.Duration, p int) float64 { return float64(d[(len(d)-1)*p/100].Microseconds()) / 1000 }
			b.ReportMetric(pc(call, 50), "call-p50-ms")
			b.ReportMetric(pc(call, 95), "call-p95-ms")
			b.ReportMetric(pc(answer, 50), "answer-p50-ms")
			b.ReportMetric(pc(answer, 95), "answer-p95-ms")
			b.ReportMetric(pc(answer, 95)/pc(call, 95), "p95-ratio")
		})
	}
}

// echoOnce connects to addr:7 from the test's namespace and has one byte
// echoed: one attempt, no retry.
func echoOnce(ctx context.Context, tn *testnet.NS, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := tn.Dial(ctx, net.JoinHostPort(addr, "7"))
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte{'x'}); err != nil {
		return err
	}
	var buf [1]byte
	_, err = io.ReadFull(c, buf[:])
	return err
}

// BenchmarkNetworkedForkBatch is BenchmarkNetworkedFork's burst of 25 made
// by one batch call instead of 25 concurrent calls, each fork networked
// (net=on: it makes its network; warm: it takes one the pool made ahead,
// refilled untimed before each batch). Its p50 is the call's latency;
// compare it with BenchmarkNetworkedFork's burst=25 p50 of the same run.
//
//	go test -run '^$' -bench 'NetworkedFork(Batch)?/net=(on|warm)(/burst=25)?$' -benchtime 5x ./internal/instance/
func BenchmarkNetworkedForkBatch(b *testing.B) {
	const forks = 25
	dir := benchDataDir(b)
	for _, net := range []string{"on", "warm"} {
		b.Run("net="+net, func(b *testing.B) {
			s := benchSetup{netNS: nettest.Namespace(b)}
			if net == "warm" {
				s.warm = forks
			}
			m := newBenchManager(b, dir, s)
			ctx := context.Background()
			src := benchStandbySource(b, m, 256)
			var lat []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				waitWarmUntimed(b, m, s.warm)
				t := time.Now()
				fs, err := m.ForkInstanceBatch(ctx, src.ID, api.ForkBatchRequest{Name: fmt.Sprintf("f%d", i), Count: forks})
				d := time.Since(t)
				b.StopTimer()
				if err != nil {
					b.Fatal(err)
				}
				for _, f := range fs {
					if !f.Network.Enabled {
						b.Fatalf("fork %s: network %+v, want enabled", f.Name, f.Network)
					}
					m.DeleteInstance(ctx, f.ID)
				}
				lat = append(lat, d)
				b.StartTimer()
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
		})
	}
}

// waitWarmUntimed waits, off the clock, until the warm pool holds n
// networks (n 0: no pool, nothing to wait for).
func waitWarmUntimed(b *testing.B, m *Manager, n int) {
	b.Helper()
	if n == 0 {
		return
	}
	b.StopTimer()
	defer b.StartTimer()
	if err := m.waitWarm(context.Background(), n); err != nil {
		b.Fatal(err)
	}
}
