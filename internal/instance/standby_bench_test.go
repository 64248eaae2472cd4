package instance

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/testfs"
)

// standbyBenchArgs: a 16 MiB working set written fast enough that a few
// thousand page writes take about a second, so a standby's dirty pages
// (≈ 6 MiB) are far below guest RAM.
const standbyBenchArgs = "forkd.ws_mib=16 forkd.write_pct=50 forkd.rate=4000 forkd.seed=3"

// standbyBenchWrites is how many guest page writes each op lets the
// restored VM make before the standby.
const standbyBenchWrites = 2048

// BenchmarkStandbyOfRestored measures the budget "standby of a
// restored VM writes O(dirty pages), not O(RAM), where the filesystem
// reflinks": the standby of a Running VM restored from Standby, after it has
// made standbyBenchWrites page writes, on a loopback XFS (reflink) and ext4,
// at 256 MiB and 1 GiB of guest RAM. Two bases:
//
//   - private: the instance's own base (nlink 1), so the standby is a Diff in
//     place.
//   - fork-first: a hardlinked fork's first standby; its base is shared with
//     its source, so the unshare guard (memfile.EnsureExclusive) makes a
//     private copy first (a reflink on XFS, a sparse copy on ext4), then the
//     Diff writes into it.
//
// Per op it reports new-MiB/op, the drop in the filesystem's free space
// across the standby (syncfs before and after), and diff-MiB/op, the pages
// the VMM's Diff wrote (from its "snapshot created" log line). Compare rows
// of one run: new bytes should not grow with RAM on XFS, and should be one
// RAM's worth for a fork's first standby on ext4.
//
//	go test -run '^$' -bench StandbyOfRestored -benchtime 3x ./internal/instance/
func BenchmarkStandbyOfRestored(b *testing.B) {
	for _, kind := range []testfs.Kind{testfs.XFS, testfs.Ext4} {
		b.Run("fs="+string(kind), func(b *testing.B) {
			fs := testfs.Mount(b, kind, 16<<30)
			for _, mib := range []int{256, 1024} {
				for _, base := range []string{"private", "fork-first"} {
					b.Run(fmt.Sprintf("ram=%dMiB/base=%s", mib, base), func(b *testing.B) {
						benchStandbyOfRestored(b, fs, mib, base == "fork-first")
					})
				}
			}
		})
	}
}

func benchStandbyOfRestored(b *testing.B, fs *testfs.FS, mib int, fork bool) {
	dir := fs.Dir
	m := newBenchManager(b, dir, benchSetup{})
	gc := fs.Kind == testfs.XFS
	if _, err := exec.LookPath("xfs_spaceman"); gc && err != nil {
		b.Log("!!! new-after-gc-MiB/op not measured: no xfs_spaceman in PATH:", err)
		gc = false
	}
	ctx := context.Background()
	src, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "src", MemoryMiB: mib, BootArgs: standbyBenchArgs})
	if err != nil {
		b.Fatal(err)
	}
	action(b, m, src.ID, "standby")
	var newBytes, gcBytes, diffBytes int64
	b.ResetTimer()
	b.StopTimer()
	for i := 0; i < b.N; i++ {
		id := src.ID
		if fork {
			f, err := m.ForkInstance(ctx, src.ID, api.ForkRequest{Name: fmt.Sprintf("f%d", i), TargetState: api.StateRunning})
			if err != nil {
				b.Fatal(err)
			}
			id = f.ID
			if n := memNlink(b, m, id, true); n < 2 {
				b.Fatalf("fork's base has nlink %d, want it shared with its source (≥ 2)", n)
			}
		} else {
			if _, err := m.Action(ctx, id, "restore", api.ActionRequest{}); err != nil {
				b.Fatal(err)
			}
			if n := memNlink(b, m, id, true); n != 1 {
				b.Fatalf("restored instance's base has nlink %d, want 1 (private)", n)
			}
		}
		waitGuestWrites(b, m, id, standbyBenchWrites)
		diffs, _ := diffLog(b, m, id)
		free := freeBytes(b, dir)
		b.StartTimer()
		if _, err := m.Action(ctx, id, "standby", api.ActionRequest{}); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		newBytes += free - freeBytes(b, dir)
		if gc {
			freeCOWPrealloc(b, dir)
			gcBytes += free - freeBytes(b, dir)
		}
		after, pages := diffLog(b, m, id)
		if after != diffs+1 {
			b.Fatalf("standby logged %d Diff snapshots, want 1 (a Full would write all of RAM)", after-diffs)
		}
		diffBytes += pages * 4096
		if n := memNlink(b, m, id, false); n != 1 {
			b.Fatalf("mem-file after standby has nlink %d, want 1 (the unshare guard's private copy)", n)
		}
		if fork {
			if err := m.DeleteInstance(ctx, id); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(newBytes)/float64(b.N)/(1<<20), "new-MiB/op")
	b.ReportMetric(float64(diffBytes)/float64(b.N)/(1<<20), "diff-MiB/op")
	if gc {
		b.ReportMetric(float64(gcBytes)/float64(b.N)/(1<<20), "new-after-gc-MiB/op")
	}
}

// freeCOWPrealloc has XFS free its speculative preallocations now (what its
// background block GC does later): a write into a reflinked extent allocates
// a whole copy-on-write extent-size-hint chunk (128 KiB by default), and the
// part of it not written stays reserved until the GC runs.
func freeCOWPrealloc(b *testing.B, dir string) {
	b.Helper()
	if out, err := exec.Command("xfs_spaceman", "-c", "prealloc -s", dir).CombinedOutput(); err != nil {
		b.Fatalf("xfs_spaceman prealloc -s %s: %v: %s", dir, err, out)
	}
}

// memNlink is the link count of the instance's base (running) or latest
// (standby) mem-file.
func memNlink(b *testing.B, m *Manager, id string, running bool) uint64 {
	b.Helper()
	g, err := m.layout.Guest(id)
	if err != nil {
		b.Fatal(err)
	}
	path := g.Latest().Memory()
	if running {
		path = g.Base().Memory()
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		b.Fatalf("stat mem-file: %v", err)
	}
	return uint64(st.Nlink)
}

// waitGuestWrites waits until the running guest has made n more page writes.
func waitGuestWrites(b *testing.B, m *Manager, id string, n uint64) {
	b.Helper()
	g, err := m.layout.Guest(id)
	if err != nil {
		b.Fatal(err)
	}
	c := firecracker.NewClient(g.VMMSock())
	defer c.Close()
	ctx := context.Background()
	first, err := c.Guest(ctx)
	if err != nil {
		b.Fatalf("guest status of %s: %v", id, err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		gs, err := c.Guest(ctx)
		if err != nil {
			b.Fatalf("guest status of %s: %v", id, err)
		}
		if gs.IntegrityErrors > 0 {
			b.Fatalf("instance %s: %d memory integrity errors, first: %s", id, gs.IntegrityErrors, gs.FirstIntegrityError)
		}
		if gs.PagesWritten >= first.PagesWritten+n {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("instance %s: only %d page writes in 60 s, want %d", id, gs.PagesWritten-first.PagesWritten, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// freeBytes syncs the filesystem holding dir (so delayed allocation and
// copy-on-write land) and returns its free bytes.
func freeBytes(b *testing.B, dir string) int64 {
	b.Helper()
	d, err := os.Open(dir)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		b.Fatalf("syncfs %s: %v", dir, err)
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(d.Fd()), &st); err != nil {
		b.Fatalf("statfs %s: %v", dir, err)
	}
	return int64(st.Bfree) * st.Bsize
}

// diffLog returns how many Diff snapshots the instance's VMMs logged and the
// page count of the last one, from the VMM log (the VMM is gone after
// standby, and with it /proc/<pid>/io).
func diffLog(b *testing.B, m *Manager, id string) (diffs int, lastPages int64) {
	b.Helper()
	g, err := m.layout.Guest(id)
	if err != nil {
		b.Fatal(err)
	}
	data, err := os.ReadFile(g.VMMLog())
	if err != nil {
		b.Fatal(err)
	}
	re := regexp.MustCompile(`msg="snapshot created" .*type=Diff .*pages_written=(\d+)`)
	all := re.FindAllSubmatch(data, -1)
	if len(all) == 0 {
		return 0, 0
	}
	n, err := strconv.ParseInt(string(all[len(all)-1][1]), 10, 64)
	if err != nil {
		b.Fatal(err)
	}
	return len(all), n
}
