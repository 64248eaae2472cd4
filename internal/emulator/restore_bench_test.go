package emulator

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/pager"
	"github.com/forkd/forkd/internal/testenv"
	"github.com/forkd/forkd/internal/uffd"
)

// BenchmarkUffdRestoreToWorkingSet measures, side by side in one run, how
// long a Uffd restore through forkd's pager takes from the load call until
// the guest has read as many pages as its working set holds (the fork-burst
// benchmark's "to working set"), for a guest in 4 KiB pages and the same
// guest with huge_pages 2M, and as the baseline the 4 KiB guest restored as
// File: 128 MiB, a 64 MiB working set, unpaced. Every iteration restores
// each once, in turn, into a new VMM; the pager's cache and the page cache
// are warm (after the first). It reports the medians and their ratios.
//
//	go test -run '^$' -bench UffdRestoreToWorkingSet -benchtime 10x ./internal/emulator
func BenchmarkUffdRestoreToWorkingSet(b *testing.B) {
	if f, err := uffd.Open(unix.O_CLOEXEC | unix.O_NONBLOCK); err != nil {
		testenv.Need(b, testenv.Uffd, fmt.Sprintf("userfaultfd unavailable here (%v)", err))
	} else {
		f.Close()
	}
	const memMib, wsMib = 128, 64
	const args = "forkd.ws_mib=64 forkd.rate=0 forkd.write_pct=20"
	guestPages := memMib << 20 / hugePageSize
	testenv.HugePages(b, 2*guestPages) // the booted 2M guest, and one restored at a time
	dir := b.TempDir()
	pc := startPager(b, filepath.Join(dir, "pager"))

	type kind struct {
		name         string
		vmstate, mem string
		samples      []time.Duration
		huge         bool
		sessions     int
	}
	kinds := []*kind{{name: "4KiB"}, {name: "2MiB", huge: true}}
	for _, k := range kinds {
		d := filepath.Join(dir, k.name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			b.Fatal(err)
		}
		p := startVMM(b, d)
		p.boot(bootSpec{vcpus: 2, memMib: memMib, huge: k.huge, bootArgs: args})
		p.waitTicks(wsMib << 20 / pageSize)
		p.pause()
		k.vmstate, k.mem = filepath.Join(d, "vmstate"), filepath.Join(d, "mem")
		p.snapshot("Full", k.vmstate, k.mem)
		p.cmd.Process.Kill()
		<-p.exited
	}
	// The baseline: the 4 KiB guest's snapshot restored as File (its
	// mem-file in the page cache, as for a warm File fork).
	file := &kind{name: "File", vmstate: kinds[0].vmstate, mem: kinds[0].mem}
	restore := func(k *kind) time.Duration {
		p := startVMM(b, dir)
		defer func() { p.cmd.Process.Kill(); <-p.exited }()
		var sock string
		if k != file {
			k.sessions++
			sess, err := pc.CreateSession(b.Context(), pager.SessionRequest{
				SessionID: fmt.Sprintf("%s-%d", k.name, k.sessions), BackingPath: k.mem, CacheKey: k.name})
			if err != nil {
				b.Fatalf("pager session: %v", err)
			}
			sock = sess.SocketPath
		}
		start := time.Now()
		if k == file {
			p.loadFile(k.vmstate, k.mem, false, true)
		} else {
			p.loadUffd(k.vmstate, sock)
		}
		for {
			st := p.guest()
			if st.IntegrityErrors != 0 {
				b.Fatalf("%s restore: integrity error: %s", k.name, st.FirstIntegrityError)
			}
			if st.PagesRead >= wsMib<<20/pageSize {
				return time.Since(start)
			}
			if time.Since(start) > time.Minute {
				b.Fatalf("%s restore: %d of %d pages read in a minute", k.name, st.PagesRead, wsMib<<20/pageSize)
			}
			time.Sleep(time.Millisecond)
		}
	}
	kinds = append(kinds, file)
	for b.Loop() {
		for _, k := range kinds {
			k.samples = append(k.samples, restore(k))
		}
	}
	median := func(d []time.Duration) time.Duration {
		s := slices.Clone(d)
		slices.Sort(s)
		return s[len(s)/2]
	}
	m4, m2, mf := median(kinds[0].samples), median(kinds[1].samples), median(file.samples)
	b.ReportMetric(float64(m4.Microseconds())/1000, "ms-uffd4KiB-p50")
	b.ReportMetric(float64(m2.Microseconds())/1000, "ms-uffd2MiB-p50")
	b.ReportMetric(float64(mf.Microseconds())/1000, "ms-file-p50")
	b.ReportMetric(float64(m2)/float64(m4), "uffd2MiB/uffd4KiB")
	b.ReportMetric(float64(m4)/float64(mf), "uffd4KiB/file")
	b.ReportMetric(float64(m2)/float64(mf), "uffd2MiB/file")
}
