package instance

import (
	"context"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/api"
)

func BenchmarkXColdBatch(b *testing.B) {
	const forks = 25
	dir := benchDataDir(b)
	m := newBenchManager(b, dir, benchSetup{})
	ctx := context.Background()
	src := benchStandbySource(b, m, 256)
	lat := map[string][]time.Duration{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, temp := range []string{"cold", "warm"} {
			b.StopTimer()
			waitTreesRefilled(b, m)
			unix.Sync()
			if temp == "cold" {
				os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
				if os.Getenv("X_REWARM_DB") == "1" {
					for _, f := range []string{"forkd.db", "forkd.db-wal"} {
						b, _ := os.ReadFile(m.cfg.DataDir + "/" + f)
						_ = b
					}
				}
			}
			b.StartTimer()
			t0 := time.Now()
			fs, err := m.ForkInstanceBatch(ctx, src.ID, api.ForkBatchRequest{Name: fmt.Sprintf("f%d%s", i, temp), Count: forks})
			lat[temp] = append(lat[temp], time.Since(t0))
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			for _, f := range fs {
				if err := m.DeleteInstance(ctx, f.ID); err != nil {
					b.Fatal(err)
				}
			}
			b.StartTimer()
		}
	}
	for _, temp := range []string{"cold", "warm"} {
		l := lat[temp]
		slices.Sort(l)
		b.ReportMetric(float64(l[len(l)/2].Nanoseconds())/1e6, temp+"-p50-ms")
	}
}

func BenchmarkXColdSerial(b *testing.B) {
	dir := benchDataDir(b)
	m := newBenchManager(b, dir, benchSetup{})
	ctx := context.Background()
	src := benchStandbySource(b, m, 256)
	lat := map[string][]time.Duration{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, temp := range []string{"cold", "warm"} {
			b.StopTimer()
			waitTreesRefilled(b, m)
			unix.Sync()
			if temp == "cold" {
				os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
			}
			b.StartTimer()
			t0 := time.Now()
			f, err := m.ForkInstance(ctx, src.ID, api.ForkRequest{Name: fmt.Sprintf("f%d%s", i, temp)})
			lat[temp] = append(lat[temp], time.Since(t0))
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			if err := m.DeleteInstance(ctx, f.ID); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
	}
	for _, temp := range []string{"cold", "warm"} {
		l := lat[temp]
		slices.Sort(l)
		b.ReportMetric(float64(l[len(l)/2].Nanoseconds())/1e6, temp+"-p50-ms")
	}
}
