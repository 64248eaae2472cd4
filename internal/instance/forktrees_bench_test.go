package instance

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// BenchmarkForkAfterTheTreesRefill times one fork of a 256 MiB Standby
// source made once the fork tree pool has refilled behind earlier forks,
// and after nothing else: no delete, no other write between them, as a
// user's next fork meets it. The pool's refill is the only filesystem work
// left over for that fork's log force to carry:
//   - after=batch25: a batch of 25 forks took 25 trees; the pool made 25
//     trees again (100 directories) before the fork.
//   - after=fork: forks back to back; the pool made one tree again before
//     each.
//
// Each fork comes 10 ms after the pool is full again (untimed). Run:
//
//	go test -run '^$' -bench ForkAfterTheTreesRefill -benchtime 40x ./internal/instance/
func BenchmarkForkAfterTheTreesRefill(b *testing.B) {
	if benchForkTrees == 0 {
		b.Skip("no fork tree pool (FORKD_BENCH_FORK_TREES=0)")
	}
	dir := benchDataDir(b)
	for _, before := range []int{25, 1} {
		name := "after=fork"
		if before > 1 {
			name = fmt.Sprintf("after=batch%d", before)
		}
		b.Run(name, func(b *testing.B) {
			m := newBenchManager(b, dir, benchSetup{})
			ctx := context.Background()
			src := benchStandbySource(b, m, 256)
			var lat []time.Duration
			var made []string
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				if before > 1 {
					// The deletes come first: their commits' fsyncs must
					// not be what carries the pool's refill.
					for _, id := range made {
						if err := m.DeleteInstance(ctx, id); err != nil {
							b.Fatal(err)
						}
					}
					made = made[:0]
					fs, err := m.ForkInstanceBatch(ctx, src.ID, api.ForkBatchRequest{Name: fmt.Sprintf("b%d", i), Count: before})
					if err != nil {
						b.Fatal(err)
					}
					for _, f := range fs {
						made = append(made, f.ID)
					}
				}
				waitTreesRefilled(b, m)
				b.StartTimer()
				t0 := time.Now()
				f, err := m.ForkInstance(ctx, src.ID, api.ForkRequest{Name: fmt.Sprintf("f%d", i)})
				lat = append(lat, time.Since(t0))
				if err != nil {
					b.Fatal(err)
				}
				made = append(made, f.ID)
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e6, "p50-ms")
		})
	}
}

// waitTreesRefilled waits until m's fork tree pool is full, then 10 ms more.
func waitTreesRefilled(b *testing.B, m *Manager) {
	b.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for m.forkTreesReady() < m.cfg.ForkTreePool {
		if time.Now().After(deadline) {
			b.Fatalf("the fork tree pool holds %d trees after 30 s, want %d", m.forkTreesReady(), m.cfg.ForkTreePool)
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(10 * time.Millisecond)
}
