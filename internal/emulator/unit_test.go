package emulator

import (
	"bytes"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseBootArgs(t *testing.T) {
	cases := []struct {
		cmdline string
		wantErr string
		check   func(guestArgs) bool
	}{
		{"console=ttyS0 reboot=k", "", func(g guestArgs) bool { return len(g.set) == 0 }},
		{"forkd.ws_mib=16 forkd.write_pct=0 forkd.rate=0 forkd.seed=7 forkd.discard_pct=100 forkd.split_mib=8", "", func(g guestArgs) bool {
			return g.wsMib == 16 && g.writePct == 0 && g.set["forkd.write_pct"] && g.rate == 0 && g.set["forkd.rate"] &&
				g.seed == 7 && g.discardPct == 100 && g.splitMib == 8
		}},
		{"forkd.ws_mib=-1", "non-negative integer", nil},
		{"forkd.ws_mib", "non-negative integer", nil},
		{"forkd.write_pct=101", "not a percentage", nil},
		{"forkd.load_seed=1", "", func(g guestArgs) bool { return g.loadSeed == 1 && g.set["forkd.load_seed"] }},
		{"forkd.load_seed=2", "want 0 or 1", nil},
		{"forkd.wsmib=4", "unknown forkd key", nil},
	}
	for _, c := range cases {
		t.Run(c.cmdline, func(t *testing.T) {
			g, err := parseBootArgs(c.cmdline)
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("parseBootArgs(%q) error %v, want %q", c.cmdline, err, c.wantErr)
				}
				return
			}
			if err != nil || !c.check(g) {
				t.Fatalf("parseBootArgs(%q) = %+v, %v", c.cmdline, g, err)
			}
		})
	}
}

func TestRegionsSplitLikeFirecrackerX86(t *testing.T) {
	const gib = 1 << 30
	cases := []struct {
		name       string
		mem, split uint64
		want       []region
	}{
		{"2 GiB is one region", 2 * gib, x86MMIOGapStart, []region{{0, 2 * gib, 0}}},
		{"3 GiB is one region", 3 * gib, x86MMIOGapStart, []region{{0, 3 * gib, 0}}},
		{"5 GiB splits at 3 GiB, rest from 4 GiB", 5 * gib, x86MMIOGapStart, []region{{0, 3 * gib, 0}, {4 * gib, 2 * gib, 3 * gib}}},
		{"forkd.split_mib=16 of 32 MiB", 32 << 20, 16 << 20, []region{{0, 16 << 20, 0}, {4 * gib, 16 << 20, 16 << 20}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := layoutRegions(c.mem, c.split); !reflect.DeepEqual(got, c.want) {
				t.Fatalf("layoutRegions(%d, %d) = %+v, want %+v", c.mem, c.split, got, c.want)
			}
		})
	}
}

func TestWorkingSetFitsBesideHeaderAndTable(t *testing.T) {
	for _, pages := range []uint64{3, 4, 100, 257, 258, 8192} {
		ws := clampWorkingSet(1<<40, pages)
		table := (ws*tableEntry + pageSize - 1) / pageSize
		if ws == 0 || 1+table+ws > pages || clampWorkingSet(ws+1, pages) != ws {
			t.Fatalf("%d pages: working set %d + table %d + header does not fit tightly", pages, ws, table)
		}
	}
}

func testVMState() *vmState {
	return &vmState{VMMVersion: "test", FirecrackerVersion: "1.16.1", SnapshotVersion: snapshotVersion{10, 0, 0}, Machine: machineConfig{VCPUCount: 2, MemSizeMib: 32, HugePages: "None"},
		BootArgs: "forkd.ws_mib=8", Regions: layoutRegions(32<<20, 16<<20),
		Workload: workloadState{Config: workloadConfig{VCPUs: 2, WSPages: 2048, WritePct: 20, Rate: 100, Seed: 1},
			Steps: []uint64{5, 7}, Generation: 3, Lineage: 99}}
}

func TestVMStateRoundTripsAndRejectsCorruption(t *testing.T) {
	data, err := encodeVMState(testVMState())
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeVMState(data)
	if err != nil || !reflect.DeepEqual(got, testVMState()) {
		t.Fatalf("decode(encode(st)) = %+v, %v; want the same state", got, err)
	}
	cases := []struct {
		name    string
		mutate  func([]byte) []byte
		wantErr string
	}{
		{"magic", func(b []byte) []byte { b[0] ^= 1; return b }, "bad magic"},
		{"format version", func(b []byte) []byte { b[16] += 7; return b }, "format version"},
		{"body byte", func(b []byte) []byte { b[vmstateHeaderLen+5] ^= 1; return b }, "CRC64 mismatch"},
		{"checksum byte", func(b []byte) []byte { b[len(b)-1] ^= 1; return b }, "CRC64 mismatch"},
		{"truncated", func(b []byte) []byte { return b[:len(b)-3] }, "length"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if _, err := decodeVMState(c.mutate(bytes.Clone(data))); err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Fatalf("decode of a vmstate with a corrupted %s: %v, want an error containing %q", c.name, err, c.wantErr)
			}
		})
	}
	bad := testVMState()
	bad.Workload.Steps = []uint64{1}
	data, _ = encodeVMState(bad)
	if _, err := decodeVMState(data); err == nil {
		t.Fatalf("a vmstate whose step counters do not match its vCPUs was accepted")
	}
}

// newTestWorkload boots a workload over anonymous memory in this process;
// steps run synchronously on the caller's goroutine.
func newTestWorkload(t *testing.T, vcpus int, memMib uint64, track bool) *workload {
	t.Helper()
	mem, err := mapAnonymous(layoutRegions(memMib<<20, memMib<<19), false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mem.close() })
	cfg := workloadConfig{VCPUs: vcpus, WSPages: clampWorkingSet(memMib<<20/pageSize/2, mem.pages()), WritePct: 50, Seed: 3, DiscardPct: 10}
	var dirty *dirtyBitmap
	if track {
		dirty = newDirtyBitmap(mem.pages())
	}
	return newBootWorkload(mem, cfg, 42, dirty, slog.New(slog.NewTextHandler(io.Discard, nil)))
}

func runSteps(w *workload, n int) {
	for i := 0; i < n; i++ {
		for k := range w.cfg.VCPUs {
			w.steps[k] = w.step(k, w.steps[k])
		}
	}
}

func TestWorkloadDetectsEachKindOfDamage(t *testing.T) {
	cases := []struct {
		name   string
		damage func(w *workload)
		want   string // "" = no integrity error expected (the twin)
	}{
		{"intact memory", func(w *workload) {}, ""},
		{"flipped payload byte", func(w *workload) {
			for j := range w.cfg.WSPages {
				w.mem.page(w.dataStart + j)[1000] ^= 0x40
			}
		}, "checksum mismatch"},
		{"stale page version", func(w *workload) {
			for j := range w.cfg.WSPages {
				ver, _ := w.tableEntryOf(j)
				t := w.mem.page(w.tableStart + j*tableEntry/pageSize)[j*tableEntry%pageSize:]
				le.PutUint64(t, ver+1) // the table moved on, the page did not
			}
		}, "version table says"},
		{"page from another lineage", func(w *workload) {
			for j := range w.cfg.WSPages {
				pg := w.mem.page(w.dataStart + j)
				le.PutUint64(pg[16:], 7)
			}
		}, "lineage"},
		{"step counter from another moment", func(w *workload) {
			le.PutUint64(w.mem.page(0)[hSteps:], w.steps[0]+3)
		}, "different moments"},
		{"dirtied free page", func(w *workload) {
			for f := w.freeStart; f < w.mem.pages(); f++ {
				w.mem.page(f)[17] = 1
			}
		}, "free page"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			w := newTestWorkload(t, 2, 4, false)
			runSteps(w, 200)
			if n := w.counters.integrityErrors.Load(); n != 0 {
				t.Fatalf("integrity errors before any damage: %d (%s)", n, w.stats().FirstIntegrityError)
			}
			c.damage(w)
			runSteps(w, 200)
			st := w.stats()
			if c.want == "" {
				requireClean(t, "undamaged workload", st)
				return
			}
			if st.IntegrityErrors == 0 || !strings.Contains(st.FirstIntegrityError, c.want) {
				t.Fatalf("after damage: %d errors, first %q; want one containing %q", st.IntegrityErrors, st.FirstIntegrityError, c.want)
			}
		})
	}
}

func TestMemFileFollowsFirecrackerFileSemantics(t *testing.T) {
	dir := t.TempDir()
	w := newTestWorkload(t, 1, 4, true)
	runSteps(w, 50)
	size := int64(w.mem.size)

	// The same dirty log each time (the VMM's Diff takes it; here it is
	// kept so the three writes below compare like with like).
	keep := func() (*dirtyBitmap, error) { return w.dirty, nil }
	full := filepath.Join(dir, "full")
	if _, err := writeMemFile(full, w.mem, nil, nil); err != nil {
		t.Fatal(err)
	}
	if s, alloc, _ := fileInfo(t, full); s != size || alloc < size {
		t.Fatalf("Full: size %d allocated %d, want %d fully allocated", s, alloc, size)
	}

	fresh := filepath.Join(dir, "diff")
	dirty := w.dirty.count()
	n, err := writeMemFile(fresh, w.mem, keep, nil)
	if err != nil {
		t.Fatal(err)
	}
	if s, _, _ := fileInfo(t, fresh); s != size || n != dirty || dataBytes(t, fresh) != int64(dirty)*pageSize {
		t.Fatalf("fresh Diff: size %d, %d pages written, %d data bytes; want size %d and exactly the %d dirty pages",
			s, n, dataBytes(t, fresh), size, dirty)
	}

	// Into a right-sized file: not truncated, clean pages keep their bytes.
	marker := bytes.Repeat([]byte{0xab}, pageSize)
	base := filepath.Join(dir, "base")
	if err := os.WriteFile(base, bytes.Repeat(marker, int(size/pageSize)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := writeMemFile(base, w.mem, keep, nil); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(base)
	for i := uint64(0); i < w.mem.pages(); i++ {
		pg := got[i*pageSize : (i+1)*pageSize]
		if w.dirty.isDirty(i) != !bytes.Equal(pg, marker) || (w.dirty.isDirty(i) && !bytes.Equal(pg, w.mem.page(i))) {
			t.Fatalf("in-place Diff: page %d dirty=%v but file page changed=%v", i, w.dirty.isDirty(i), !bytes.Equal(pg, marker))
		}
	}

	// Into a wrong-sized file: truncated to zero first, old data gone.
	wrong := filepath.Join(dir, "wrong")
	if err := os.WriteFile(wrong, bytes.Repeat(marker, 3), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := writeMemFile(wrong, w.mem, keep, nil); err != nil {
		t.Fatal(err)
	}
	got, _ = os.ReadFile(wrong)
	if int64(len(got)) != size || bytes.Contains(got, marker) {
		t.Fatalf("Diff into a wrong-sized file kept its old bytes (or has size %d, want %d)", len(got), size)
	}
}

func BenchmarkWorkloadStep(b *testing.B) {
	mem, err := mapAnonymous(layoutRegions(64<<20, 32<<20), false)
	if err != nil {
		b.Fatal(err)
	}
	defer mem.close()
	cfg := workloadConfig{VCPUs: 1, WSPages: 8192, WritePct: 20, Seed: 1}
	w := newBootWorkload(mem, cfg, 1, newDirtyBitmap(mem.pages()), slog.New(slog.NewTextHandler(io.Discard, nil)))
	b.ResetTimer()
	for b.Loop() {
		w.steps[0] = w.step(0, w.steps[0])
	}
	if w.counters.integrityErrors.Load() != 0 {
		b.Fatal(w.stats().FirstIntegrityError)
	}
}

// TestLoadSeedGivesEachLoadItsOwnPages: with forkd.load_seed two loads of
// one vmstate choose different pages at the same step (and a load without
// it the pages its source would); the working set stays the same.
func TestLoadSeedGivesEachLoadItsOwnPages(t *testing.T) {
	pagesOf := func(loadSeed bool, lineage uint64) []uint64 {
		cfg := workloadConfig{VCPUs: 1, WSPages: 1 << 12, Seed: 1, LoadSeed: loadSeed}
		w := newLoadedWorkload(&guestMemory{}, workloadState{Config: cfg, Steps: []uint64{100}}, lineage, nil, slog.Default())
		var out []uint64
		for s := uint64(100); s < 116; s++ {
			out = append(out, splitmix(w.seed^splitmix(s))%cfg.WSPages)
		}
		return out
	}
	if a, b := pagesOf(false, 1), pagesOf(false, 2); !reflect.DeepEqual(a, b) {
		t.Fatalf("without load_seed two loads chose %v and %v, want the same pages", a, b)
	}
	if a, b := pagesOf(true, 1), pagesOf(true, 2); reflect.DeepEqual(a, b) {
		t.Fatalf("with load_seed two loads chose the same pages %v", a)
	}
}
