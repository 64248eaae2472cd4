package prefetch

import (
	"context"
	"crypto/rand"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/testfs"
)

// benchSink keeps the touch loops' loads from being optimised away.
var benchSink byte

// BenchmarkColdWorkingSet asks where a cold restore's time to its working
// set goes outside the VMM: reading a 64 MiB working set (every page of a
// dense 64 MiB mem-file, recorded in a random first-touch order) from an
// XFS loopback after its page cache is dropped. The variants run in turn
// within each iteration, so they meet the same load:
//
//   - fault: a private mapping touched in the recorded order, one byte per
//     page (a File restore without prefetch: the kernel's readaround);
//   - populate: Populate over the recording's plan (a File replay's reads,
//     the pager's readahead);
//   - populate+fault: both, one after the other (a File replay, then the
//     guest);
//   - populate+read: populate, then the pages read again in 512 KiB runs
//     of the recording (a pager's replay reader on the page cache the
//     readahead filled, with a pager cache that has none of the pages);
//   - populate+read+copy: the same, each page then copied into a 4 KiB
//     buffer of its own that is kept (what a cold pager's replay reader
//     also does: it caches every page it read).
//
// It reports each variant's median in ms (over b.N iterations) and its
// ratio to fault's. It needs root (a loopback), so it runs only with
// -bench: go test -run '^$' -bench ColdWorkingSet -benchtime 9x ./internal/prefetch
func BenchmarkColdWorkingSet(b *testing.B) {
	const size = 64 << 20
	fs := testfs.Mount(b, testfs.XFS, 1<<30)
	path := filepath.Join(fs.Dir, "memory")
	data := make([]byte, size)
	rand.Read(data)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		b.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	pages := make([]uint64, size/4096)
	for i, p := range mrand.Perm(len(pages)) {
		pages[i] = uint64(p)
	}
	runs := Plan(pages, 16, 2048)
	fault := func() error {
		m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_PRIVATE)
		if err != nil {
			return err
		}
		for _, p := range pages {
			benchSink += m[p*4096]
		}
		return unix.Munmap(m)
	}
	populate := func() error {
		_, err := Populate(context.Background(), f, runs)
		return err
	}
	variants := []struct {
		name string
		run  func() error
	}{
		{"fault", fault},
		{"populate", populate},
		{"populate+fault", func() error {
			if err := populate(); err != nil {
				return err
			}
			return fault()
		}},
		{"populate+read", func() error { return populateAndRead(f, pages, populate, false) }},
		{"populate+read+copy", func() error { return populateAndRead(f, pages, populate, true) }},
	}
	samples := make([][]time.Duration, len(variants))
	b.ResetTimer()
	for range b.N {
		for i, v := range variants {
			if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
				b.Fatal(err)
			}
			t0 := time.Now()
			if err := v.run(); err != nil {
				b.Fatalf("%s: %v", v.name, err)
			}
			samples[i] = append(samples[i], time.Since(t0))
		}
	}
	b.StopTimer()
	median := func(ds []time.Duration) float64 {
		s := slices.Clone(ds)
		slices.Sort(s)
		return float64(s[len(s)/2]) / 1e6
	}
	base := median(samples[0])
	for i, v := range variants {
		m := median(samples[i])
		b.ReportMetric(m, v.name+"-ms")
		if i > 0 {
			b.ReportMetric(m/base, fmt.Sprintf("%s/fault", v.name))
		}
	}
}

// populateAndRead populates, then reads the recording's pages in runs of
// up to 512 KiB (contiguous pages, in first-touch order), and with keep
// copies each page into a buffer of its own that it keeps to the end.
func populateAndRead(f *os.File, pages []uint64, populate func() error, keep bool) error {
	if err := populate(); err != nil {
		return err
	}
	buf := make([]byte, 512<<10)
	var kept [][]byte
	if keep {
		kept = make([][]byte, 0, len(pages))
	}
	for _, r := range Plan(pages, 0, 128) {
		n := r.Pages * 4096
		if _, err := f.ReadAt(buf[:n], int64(r.Page*4096)); err != nil {
			return err
		}
		for i := uint64(0); keep && i < r.Pages; i++ {
			kept = append(kept, append([]byte(nil), buf[i*4096:(i+1)*4096]...))
		}
	}
	if keep {
		benchSink += kept[len(kept)-1][0]
	}
	return nil
}
