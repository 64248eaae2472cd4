package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/testenv"
)

// shortTempDir is a temp dir short enough for the VMM sockets under it
// (108 bytes); t.TempDir under a long test name is not.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "fb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestMain(m *testing.M) {
	os.Exit(testenv.Main(m))
}

func buildForkd(t *testing.T) string {
	t.Helper()
	return testenv.ForkdBinary(t)
}

// TestForkBurstEndToEnd runs a tiny burst against a real daemon and the
// emulator: every fork must come up with memory_check ok, and the report
// must carry the measurements.
func TestForkBurstEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a daemon and VMMs")
	}
	bin := buildForkd(t)
	for _, from := range []string{FromSnapshot, FromStandby} {
		t.Run("from "+from, func(t *testing.T) { testForkBurst(t, bin, from) })
	}
}

func testForkBurst(t *testing.T, bin, from string) {
	rep, out := runForkBurst(t, 3*time.Minute, Options{
		Config: Config{SizesMiB: []int{64}, WorkingSetMiB: 4, Forks: []int{3}, Rates: []int{20000}, ForkFrom: from, Prefetch: []string{PrefetchOff},
			Backends: []string{api.BackendFile, api.BackendUffd}, Strategies: []string{StrategyHardlink, StrategyCopy},
			Batch: true, BatchCalls: 3},
		Binary: bin,
	})
	ran := 0
	for _, c := range rep.Cells {
		if c.Skipped != "" {
			continue
		}
		ran++
		name := fmt.Sprintf("%s/%s/%s", c.Strategy, c.Backend, c.Temperature)
		if c.Failed != 0 {
			t.Errorf("%s: %d of %d forks failed: %v", name, c.Failed, c.Forks, c.Errors)
		}
		if c.MemoryChecks["ok"] != c.Forks {
			t.Errorf("%s: memory checks %v, want %d ok", name, c.MemoryChecks, c.Forks)
		}
		if c.Fork.N != c.Forks || c.Restore.N != c.Forks || c.Touch.N != c.Forks {
			t.Errorf("%s: samples fork %d restore %d touch %d, want %d each", name, c.Fork.N, c.Restore.N, c.Touch.N, c.Forks)
		}
		if c.Memory.Pss <= 0 {
			t.Errorf("%s: no PSS measured for the fork VMMs", name)
		}
		if c.ForkWall < c.Fork.Max || c.ForkWall > c.Wall {
			t.Errorf("%s: forks wall %v, want between the slowest fork (%v) and the whole burst (%v)", name, c.ForkWall, c.Fork.Max, c.Wall)
		}
		// Each burst's forks were also made by 3 batch calls in a row, and
		// their p50 is the batched fork's latency.
		if b := c.Batch; b == nil || b.Err != "" || len(b.Calls) != 3 || b.Call != Summarize(b.Calls).P50 || b.Call <= 0 || b.CPU == nil {
			t.Errorf("%s: batch %+v, want 3 calls, their p50 and their CPU", name, b)
		}
		// The bench started the daemon, so it knows what a fork cost it.
		if c.ForkCPU == nil || c.ForkCPU.Daemon <= 0 || c.ForkCPU.Client <= 0 {
			t.Errorf("%s: fork CPU %+v, want the daemon's and the client's", name, c.ForkCPU)
		}
	}
	// Every serial fork is measured beside a floor sample on the same
	// filesystem: the budgets are ratios against it.
	for _, s := range rep.Serial {
		if s.Error != "" || s.Fork.N == 0 || s.Floor.N != s.Fork.N {
			t.Errorf("serial %d MiB %s: %d forks, %d floor samples, error %q; want as many floor samples as forks", s.SizeMiB, s.Strategy, s.Fork.N, s.Floor.N, s.Error)
		}
		if s.ForkCPU == nil || s.ForkCPU.Daemon <= 0 {
			t.Errorf("serial %d MiB %s: fork CPU %+v, want the daemon's", s.SizeMiB, s.Strategy, s.ForkCPU)
		}
	}
	// The pager needs userfaultfd; where it exists the Uffd cells must run.
	_, uffdErr := os.Stat("/dev/userfaultfd")
	for _, c := range rep.Cells {
		mustRun := c.Strategy == StrategyHardlink && (c.Backend == api.BackendFile || uffdErr == nil && os.Geteuid() == 0)
		if mustRun && c.Skipped != "" {
			t.Errorf("hardlink/%s/%s skipped (%s): forkd's own path must run here", c.Backend, c.Temperature, c.Skipped)
		}
		// The daemon forces the strategy (--fork-strategy): each fork's
		// fork_mode must say it was made that way.
		if c.Skipped == "" && c.ForkModes[c.Strategy] != c.Forks {
			t.Errorf("%s/%s/%s: fork modes %v, want %d %s", c.Strategy, c.Backend, c.Temperature, c.ForkModes, c.Forks, c.Strategy)
		}
		if c.Strategy == StrategyCopy && c.Backend == api.BackendFile && c.Skipped != "" {
			t.Errorf("copy/file/%s skipped (%s): the daemon can force a copy on any filesystem", c.Temperature, c.Skipped)
		}
	}
	if ran == 0 {
		t.Fatalf("no cell ran:\n%s", out)
	}
	if !strings.Contains(out, "hardlink") {
		t.Errorf("table lacks the hardlink rows")
	}
}

// TestBurstReportsCorruptedMemory is the twin of the memory checks above: a
// snapshot whose mem-file was corrupted must show up as failed forks with
// the guest's integrity error, not as a clean cell.
func TestBurstReportsCorruptedMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a daemon and VMMs")
	}
	bin := buildForkd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := shortTempDir(t)
	d, err := StartDaemon(ctx, DaemonSpec{Binary: bin, DataDir: filepath.Join(dir, "d"), LogPath: filepath.Join(dir, "d.log")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Stop(context.Background()); err != nil {
			t.Errorf("stop daemon: %v", err)
		}
	})
	cfg, err := Config{SizesMiB: []int{64}, WorkingSetMiB: 4, Forks: []int{2}, Rates: []int{20000}, Backends: []string{api.BackendFile}}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	disk, err := DiskOf(dir)
	if err != nil {
		t.Fatal(err)
	}
	layout, err := guestdir.New(d.DataDir)
	if err != nil {
		t.Fatal(err)
	}
	r := &runner{cfg: cfg, disk: disk, progress: func(string) {}, tag: "twin"}
	dm := &daemon{svc: d.Client, layout: layout, v: Variant{Strategy: StrategyHardlink, Prefetch: PrefetchAuto}}
	src, err := r.createSource(ctx, dm, 64, 20000, cfg.bootArgs(64, 20000), false)
	if err != nil {
		t.Fatal(err)
	}
	par, err := r.freshParent(ctx, dm, src)
	if err != nil {
		t.Fatal(err)
	}
	snap, err := layout.Snapshot(par.id)
	if err != nil {
		t.Fatal(err)
	}
	corruptEveryPage(t, snap.Memory())

	cell := r.burst(ctx, dm, par, cellKey{size: 64, strategy: StrategyHardlink, prefetch: PrefetchAuto, rate: 20000, forks: 2,
		backend: api.BackendFile, temp: Cold, workload: WorkloadSame})
	if cell.Failed == 0 && cell.MemoryChecks["ok"] == cell.Forks {
		t.Fatalf("forks of a corrupted snapshot reported clean: %+v", cell)
	}
	t.Logf("failed %d/%d: %q", cell.Failed, cell.Forks, cell.Errors)
	if !strings.Contains(strings.Join(cell.Errors, "\n"), "integrity") {
		t.Errorf("errors %q do not name the integrity error", cell.Errors)
	}
}

// corruptEveryPage flips a byte in the middle of every 4 KiB page.
func corruptEveryPage(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	for off := int64(2048); off < st.Size(); off += 4096 {
		if _, err := f.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		b[0] ^= 0xff
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
}

// TestForkBurstMeasuresPrefetch runs the prefetch axis end to end, tiny:
// with prefetch auto every measured fork replays a recording made before
// the burst (the cold bursts' too), the report carries the time to the
// working set and the waste, and the differing workload runs beside it.
func TestForkBurstMeasuresPrefetch(t *testing.T) {
	if testing.Short() {
		t.Skip("starts daemons and VMMs")
	}
	bin := buildForkd(t)
	backends := []string{api.BackendFile}
	if _, err := os.Stat("/dev/userfaultfd"); err == nil && os.Geteuid() == 0 {
		backends = append(backends, api.BackendUffd)
	}
	rep, out := runForkBurst(t, 6*time.Minute, Options{
		Config: Config{SizesMiB: []int{64}, WorkingSetMiB: 4, Forks: []int{2}, Rates: []int{-1}, Backends: backends,
			Temperatures: []string{Cold, Warm}, Prefetch: []string{PrefetchOff, PrefetchAuto}, DiffersRuns: 1, SerialForks: -1},
		Binary:     bin,
		DaemonArgs: []string{"--prefetch-window", "1s"},
	})
	differs := 0
	for _, c := range rep.Cells {
		name := fmt.Sprintf("%s/%s/%s/%s", c.Prefetch, c.Backend, c.Temperature, c.workloadStr())
		if c.Skipped != "" || c.Failed != 0 || c.MemoryChecks["ok"] != c.Forks {
			t.Errorf("%s: skipped %q, %d failed %v, checks %v", name, c.Skipped, c.Failed, c.Errors, c.MemoryChecks)
			continue
		}
		if c.ToWorkingSet.N != c.Forks {
			t.Errorf("%s: %d times to the working set, want %d", name, c.ToWorkingSet.N, c.Forks)
		}
		if c.Workload == WorkloadDiffers {
			differs++
		}
		switch {
		case c.Prefetch == PrefetchOff && c.PrefetchStats != nil:
			t.Errorf("%s: prefetch figures from a daemon with prefetch off: %+v", name, c.PrefetchStats)
		case c.Prefetch == PrefetchAuto && (c.PrefetchStats == nil || c.PrefetchStats.Modes["replay"] != c.Forks):
			t.Errorf("%s: prefetch %+v, want every fork to replay", name, c.PrefetchStats)
		}
	}
	if differs != 2*len(backends) {
		t.Errorf("%d differing-workload cells, want %d (off and auto per backend)", differs, 2*len(backends))
	}
	if !strings.Contains(out, "prefetch auto/off to-ws p50") || !strings.Contains(out, "differing workload") {
		t.Errorf("ratios lack the prefetch comparisons:\n%s", out)
	}
}

// TestForkBurstTimesSerialForksOfEveryBinary compares two builds (the same
// binary twice) in one run: each build's daemon must time its own serial
// forks, each fork beside a floor sample, in a row of the JSON report that
// names its build, and the table must compare the second build's serial
// p50 with the first's. Before, only the first daemon timed serial forks.
func TestForkBurstTimesSerialForksOfEveryBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("starts daemons and VMMs")
	}
	bin := buildForkd(t)
	// More forks than one round, so the daemons take turns twice.
	const forks = SerialRound + 2
	rep, table := runForkBurst(t, 4*time.Minute, Options{
		Config: Config{SizesMiB: []int{64}, WorkingSetMiB: 4, Forks: []int{1}, Rates: []int{20000}, Prefetch: []string{PrefetchOff},
			Backends: []string{api.BackendFile}, Temperatures: []string{Warm}, Strategies: []string{StrategyHardlink},
			Builds: []string{"a", "b"}, SerialForks: forks},
		Binaries: map[string]string{"a": bin, "b": bin},
	})
	var js bytes.Buffer
	// Read the rows as a script would, from the JSON report.
	if err := rep.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var got struct {
		Serial []struct {
			SizeMiB  int    `json:"size_mib"`
			Prefetch string `json:"prefetch"`
			Build    string `json:"build"`
			Fork     struct {
				N   int   `json:"n"`
				P50 int64 `json:"p50_ns"`
			} `json:"fork"`
			Floor struct {
				N int `json:"n"`
			} `json:"floor"`
			Error string `json:"error"`
		} `json:"serial_forks"`
	}
	if err := json.Unmarshal(js.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	builds := map[string]int{}
	for _, s := range got.Serial {
		builds[s.Build]++
		if s.Error != "" || s.Fork.N != forks || s.Floor.N != forks || s.Fork.P50 <= 0 {
			t.Errorf("serial forks of build %q (prefetch %q): %d forks, %d floor samples, p50 %d ns, error %q; want %d of each",
				s.Build, s.Prefetch, s.Fork.N, s.Floor.N, s.Fork.P50, s.Error, forks)
		}
		if want := PrefetchOff + "@" + s.Build; s.Prefetch != want {
			t.Errorf("serial row of build %q names prefetch %q, want %q", s.Build, s.Prefetch, want)
		}
	}
	if len(got.Serial) != 2 || builds["a"] != 1 || builds["b"] != 1 {
		t.Errorf("serial rows %+v: want one for build a and one for build b", got.Serial)
	}
	if !strings.Contains(table, "p50/a") {
		t.Errorf("serial table does not compare the builds' p50 with the first's:\n%s", table)
	}
	found := false
	for _, x := range rep.Ratios() {
		found = found || x.Name == "64 MiB hardlink prefetch off: serial fork p50 b/a"
	}
	if !found {
		t.Errorf("ratios lack the serial fork p50 of build b over a: %v", rep.Ratios())
	}
}

// runForkBurst runs ForkBurst with opt (in a short temp dir of its own)
// within timeout, failing t with the run's progress if it fails, and logs
// and returns the report and its table.
// TestForkBurstRunsRoundsInTurn runs two rounds of 1-fork bursts: the
// backends take turns within each round, every round is its own cell
// (Run), and the budget is quoted as the median of the rounds' ratios.
func TestForkBurstRunsRoundsInTurn(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a daemon and VMMs")
	}
	rep, table := runForkBurst(t, 4*time.Minute, Options{
		Config: Config{SizesMiB: []int{64}, WorkingSetMiB: 4, Forks: []int{1}, Rates: []int{-1}, Prefetch: []string{PrefetchOff},
			Backends: []string{api.BackendFile, api.BackendUffd}, Temperatures: []string{Warm}, Strategies: []string{StrategyHardlink},
			SerialForks: -1, Rounds: 2},
		Binary: buildForkd(t),
	})
	var order []string
	for _, c := range rep.Cells {
		order = append(order, fmt.Sprintf("%s#%d", c.Backend, c.Run))
		if c.Skipped != "" || c.Failed > 0 || c.MemoryChecks["ok"] != 1 || c.ToWorkingSet.N != 1 {
			t.Errorf("cell %s round %d: skipped %q, %d failed, checks %v, %d touched", c.Backend, c.Run, c.Skipped, c.Failed, c.MemoryChecks, c.ToWorkingSet.N)
		}
		// The pager installs every page of a Uffd fork: it used CPU.
		if c.Backend == api.BackendUffd && c.PagerCPU <= 0 {
			t.Errorf("cell uffd round %d: pager CPU per fork %v, want > 0", c.Run, c.PagerCPU)
		}
	}
	if want := []string{"file#1", "uffd#1", "file#2", "uffd#2"}; !slices.Equal(order, want) {
		t.Errorf("cells ran in order %v, want %v (rounds taking turns)", order, want)
	}
	const ratio = "64 MiB rate -1, 1 forks: prefetch off warm: uffd/file to-ws p50, median of 2 rounds"
	if !slices.ContainsFunc(rep.Ratios(), func(r Ratio) bool { return r.Name == ratio && r.Value > 0 }) {
		t.Errorf("ratios lack %q", ratio)
	}
	if !strings.Contains(table, "to ws by round") {
		t.Errorf("table lacks the rounds")
	}
}

func runForkBurst(t *testing.T, timeout time.Duration, opt Options) (*Report, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	opt.Dir = shortTempDir(t)
	var log bytes.Buffer
	rep, err := ForkBurst(ctx, opt, func(s string) { fmt.Fprintln(&log, s) })
	if err != nil {
		t.Fatalf("ForkBurst: %v\nprogress:\n%s", err, log.String())
	}
	var out bytes.Buffer
	if err := rep.WriteTable(&out); err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", out.String())
	return rep, out.String()
}

// TestForkBurstMeasuresUffdOnHugePages runs the uffd-2M backend end to
// end, tiny: its source is backed by 2 MiB pages, every fork restores
// through the pager and replays, reads its working set with every page
// checked, and the report compares its time to the working set with File's.
func TestForkBurstMeasuresUffdOnHugePages(t *testing.T) {
	if testing.Short() {
		t.Skip("starts daemons and VMMs")
	}
	testenv.NeedRoot(t)
	if _, err := os.Stat("/dev/userfaultfd"); err != nil {
		testenv.Need(t, testenv.Uffd, err.Error())
	}
	cfg := Config{SizesMiB: []int{64}, WorkingSetMiB: 4, Forks: []int{2}, Rates: []int{-1},
		Backends: []string{api.BackendFile, BackendUffdHuge}, Temperatures: []string{Cold, Warm},
		Prefetch: []string{PrefetchAuto}, SerialForks: -1}
	testenv.HugePages(t, 64) // the run needs 32 + 3 × 6 (enoughHugePages)
	bin := buildForkd(t)
	rep, out := runForkBurst(t, 6*time.Minute, Options{Config: cfg, Binary: bin, DaemonArgs: []string{"--prefetch-window", "1s"}})
	huge := 0
	for _, c := range rep.Cells {
		name := fmt.Sprintf("%s/%s", c.Backend, c.Temperature)
		if c.Skipped != "" || c.Failed != 0 || c.MemoryChecks["ok"] != c.Forks || c.ToWorkingSet.N != c.Forks {
			t.Errorf("%s: skipped %q, %d failed %v, checks %v, %d times to ws", name, c.Skipped, c.Failed, c.Errors, c.MemoryChecks, c.ToWorkingSet.N)
			continue
		}
		if c.Backend == BackendUffdHuge {
			huge++
			if c.PrefetchStats == nil || c.PrefetchStats.Modes["replay"] != c.Forks {
				t.Errorf("%s: prefetch %+v, want every fork to replay", name, c.PrefetchStats)
			}
		}
	}
	if huge != 2 {
		t.Errorf("%d uffd-2M cells, want 2 (cold, warm)", huge)
	}
	if !strings.Contains(out, "uffd-2M/file to-ws p50") {
		t.Errorf("ratios lack uffd-2M/file:\n%s", out)
	}
}

// TestKeepLogsCopiesEveryLogOut: with --keep on a loopback filesystem
// the data dir is removed with it, so its logs are copied out, at their
// relative paths, and nothing else is.
func TestKeepLogsCopiesEveryLogOut(t *testing.T) {
	work := t.TempDir()
	files := map[string]string{
		"hardlink-1.log":                          "daemon",
		"hardlink-1/pager/0.1.0-dev/pager.log":    "pager",
		"hardlink-1/jail/vm/root/memory":          "guest memory",
		"hardlink-1/jail/vm/root/firecracker.log": "vmm",
	}
	for rel, body := range files {
		p := filepath.Join(work, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out, err := keepLogs(work, filepath.Join(t.TempDir(), "fb-logs-"))
	if err != nil {
		t.Fatal(err)
	}
	for rel, body := range files {
		b, err := os.ReadFile(filepath.Join(out, rel))
		switch {
		case strings.HasSuffix(rel, ".log") && (err != nil || string(b) != body):
			t.Errorf("kept %s = %q, %v; want %q", rel, b, err, body)
		case !strings.HasSuffix(rel, ".log") && err == nil:
			t.Errorf("kept %s, which is not a log", rel)
		}
	}
}

// TestForkBurstTimesColdForksEachAfterADrop: with drop-caches, a cold
// cell's batch calls and its concurrent calls each come right after a drop
// (the batch calls read back what the one before the cell emptied), and
// cold serial forks, each right after a drop too, are timed beside the warm
// ones for the cold cells to be set against. The drops are counted here,
// not made: the host's caches are other tests' too.
func TestForkBurstTimesColdForksEachAfterADrop(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a daemon and VMMs")
	}
	testenv.NeedRoot(t) // the run refuses drop-caches to anyone else
	var drops atomic.Int64
	dropPageCache = func() error { drops.Add(1); return nil }
	t.Cleanup(func() { dropPageCache = DropPageCache })
	bin := buildForkd(t)
	const serial, calls = 2, 2
	rep, _ := runForkBurst(t, 3*time.Minute, Options{
		Config: Config{SizesMiB: []int{64}, WorkingSetMiB: 4, Forks: []int{2}, Rates: []int{20000}, Prefetch: []string{PrefetchOff},
			Backends: []string{api.BackendFile}, Temperatures: []string{Cold}, Strategies: []string{StrategyHardlink},
			Batch: true, BatchCalls: calls, SerialForks: serial, DropCaches: true},
		Binary: bin,
	})
	var warm, cold *SerialFork
	for i := range rep.Serial {
		switch s := &rep.Serial[i]; s.Temperature {
		case "":
			warm = s
		case Cold:
			cold = s
		}
	}
	if warm == nil || cold == nil || warm.Fork.N != serial || cold.Fork.N != serial || cold.Error != "" {
		t.Fatalf("serial rows %+v: want a warm and a cold one of %d forks each", rep.Serial, serial)
	}
	// One drop per cold serial fork; for the cell, one before it, one
	// before each batch call and one before the concurrent calls.
	if want := int64(serial + 1 + calls + 1); drops.Load() != want {
		t.Errorf("%d drops, want %d", drops.Load(), want)
	}
	found := false
	for _, r := range rep.Ratios() {
		found = found || r.Name == "64 MiB file cold: one batch call of the burst's forks, p50 / cold serial fork p50 (like for like)"
	}
	if !found {
		t.Errorf("no like-for-like ratio of the cold batch calls: %v", rep.Ratios())
	}
}
