package instance

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"syscall"
	"testing"

	"github.com/forkd/forkd/internal/api"
)

// BenchmarkForkOfStandby measures the API-level fork of a Standby instance
// at two guest RAM sizes. DESIGN §8: the fork never touches a mem-file byte
// (hardlink), so its cost should be flat in RAM size; compare the two
// sub-benchmarks of one run, never absolute times.
func BenchmarkForkOfStandby(b *testing.B) {
	for _, mib := range []int{64, 1024} {
		b.Run(fmt.Sprintf("ram=%dMiB", mib), func(b *testing.B) {
			m := newBenchManager(b)
			ctx := context.Background()
			src, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "src", MemoryMiB: mib, BootArgs: "forkd.ws_mib=8 forkd.rate=200"})
			if err != nil {
				b.Fatal(err)
			}
			if _, err := m.Action(ctx, src.ID, "standby", api.ActionRequest{}); err != nil {
				b.Fatal(err)
			}
			syscall.Sync() // the standby's dirty pages must not land in the forks' fsyncs
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := m.ForkInstance(ctx, src.ID, api.ForkRequest{Name: fmt.Sprintf("f%d", i)}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func newBenchManager(b *testing.B) *Manager {
	b.Helper()
	if skipReason != "" {
		b.Skip("SKIP (needs forkd vmm): " + skipReason)
	}
	dir := b.TempDir()
	m, err := New(context.Background(), Config{
		DataDir: dir,
		VMM:     VMMSpec{Binary: forkdBin, Args: []string{"vmm"}, Emulator: true},
		Logger:  slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		list, _ := m.ListInstances(context.Background())
		for _, in := range list {
			m.DeleteInstance(context.Background(), in.ID)
		}
		m.Close()
	})
	return m
}
