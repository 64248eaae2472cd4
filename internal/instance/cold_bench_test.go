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

// BenchmarkForkCold times forks of a 256 MiB Standby source made right
// after the host's page cache and the kernel's dentry and inode caches were
// dropped (cold) against the same made without (warm), taking turns: one
// fork a call (forks=1) and a batch of 25 (forks=25). It shows what a cold
// call costs and that a batch pays it once, not per fork. Root only (it
// writes /proc/sys/vm/drop_caches, for the whole host). With
// FORKD_BENCH_COLD_DB_CACHED=1 the daemon's database and WAL are read back
// in after each drop, so what is left of the cold cost is the rest.
//
//	go test -run '^$' -bench ForkCold -benchtime 15x ./internal/instance/
func BenchmarkForkCold(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("dropping the host's caches needs root")
	}
	dir := benchDataDir(b)
	dbCached := os.Getenv("FORKD_BENCH_COLD_DB_CACHED") == "1"
	for _, forks := range []int{1, 25} {
		b.Run(fmt.Sprintf("forks=%d", forks), func(b *testing.B) {
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
						dropHostCaches(b, m, dbCached)
					}
					b.StartTimer()
					t0 := time.Now()
					ids, err := benchForks(ctx, m, src.ID, fmt.Sprintf("f%d%s", i, temp), forks)
					lat[temp] = append(lat[temp], time.Since(t0))
					b.StopTimer()
					if err != nil {
						b.Fatal(err)
					}
					for _, id := range ids {
						if err := m.DeleteInstance(ctx, id); err != nil {
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
		})
	}
}

// benchForks makes n forks of source ref named name: one fork call when n
// is 1, else one batch call.
func benchForks(ctx context.Context, m *Manager, ref, name string, n int) ([]string, error) {
	if n == 1 {
		f, err := m.ForkInstance(ctx, ref, api.ForkRequest{Name: name})
		return []string{f.ID}, err
	}
	fs, err := m.ForkInstanceBatch(ctx, ref, api.ForkBatchRequest{Name: name, Count: n})
	ids := make([]string, len(fs))
	for i, f := range fs {
		ids[i] = f.ID
	}
	return ids, err
}

// dropHostCaches drops the host's page cache and its dentry and inode
// caches; dbCached then reads m's database and WAL back in.
func dropHostCaches(b *testing.B, m *Manager, dbCached bool) {
	b.Helper()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		b.Fatal(err)
	}
	if !dbCached {
		return
	}
	for _, p := range []string{m.layout.DB(), m.layout.DB() + "-wal"} {
		if _, err := os.ReadFile(p); err != nil {
			b.Fatal(err)
		}
	}
}
