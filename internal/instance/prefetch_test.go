package instance

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/testenv"
)

// prefetchBootArgs: an 8 MiB working set read at 20,000 pages/s, so a
// one-second window sees the whole working set, in a 32 MiB guest.
const prefetchBootArgs = "forkd.ws_mib=8 forkd.rate=20000 forkd.write_pct=20"

func withPrefetch(window time.Duration) testOpt {
	return func(c *Config) { c.Prefetch, c.PrefetchWindow = PrefetchAuto, window }
}

// recordBudget bounds the recordings of the record-and-replay test to half
// the working set, which a guest running the same workload touches again
// early in its window however loaded the machine is. (With the window
// alone, what is recorded, and so what the replay's window counts as
// waste, would depend on how fast the two guests ran.)
const recordBudget = 1024

// prefetchSource boots a source with the prefetch workload and stands it by.
func prefetchSource(t *testing.T, m *Manager) api.Instance {
	t.Helper()
	src, err := m.CreateInstance(context.Background(), api.CreateInstanceRequest{
		Name: "src", MemoryMiB: testMemMiB, BootArgs: prefetchBootArgs,
	})
	if err != nil {
		t.Fatal(err)
	}
	verifyGuest(t, m, src.ID)
	return action(t, m, "src", "standby")
}

// waitPrefetch waits until the instance's prefetch figures are final.
func waitPrefetch(t *testing.T, m *Manager, id string) api.Prefetch {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		in, err := m.GetInstance(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		if in.Prefetch != nil && in.Prefetch.Done {
			return *in.Prefetch
		}
		if time.Now().After(deadline) {
			t.Fatalf("instance %s: prefetch not done after 60 s: %+v", id, in.Prefetch)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// dropPageCache evicts a mem-file's unmapped pages from the page cache, so
// a restore reads it from disk.
func dropPageCache(t *testing.T, path string) {
	t.Helper()
	if err := testenv.EvictPageCache(path); err != nil {
		t.Fatal(err)
	}
}

// TestPrefetchRecordsOnFirstRestoreAndReplaysOnLaterOnes: the first restore
// of a cache key records its working set within the size budget (without
// the emulator's help: from the pager's faults, or the pages the VMM maps),
// a fork of the same key replays it and reaches it with little waste, and
// the guest's memory is intact throughout.
func TestPrefetchRecordsOnFirstRestoreAndReplaysOnLaterOnes(t *testing.T) {
	for _, backend := range []string{api.BackendFile, api.BackendUffd} {
		t.Run(backend, func(t *testing.T) {
			if backend == api.BackendUffd {
				if _, err := os.Stat("/dev/userfaultfd"); err != nil {
					testenv.Need(t, testenv.Uffd, "no /dev/userfaultfd: "+err.Error())
				}
			}
			reg := prometheus.NewRegistry()
			m := newTestManager(t, withPrefetch(5*time.Second), func(c *Config) {
				c.ForkRestoreBackend, c.PrefetchMaxBytes, c.Registerer = backend, recordBudget*4096, reg
			})
			src := prefetchSource(t, m)
			key := src.SnapshotCacheKey

			first := fork(t, m, "src", api.ForkRequest{Name: "first", TargetState: api.StateRunning})
			rec := waitPrefetch(t, m, first.ID)
			if rec.Mode != "record" || rec.Error != "" {
				t.Fatalf("first restore of the key: prefetch %+v, want a recording", rec)
			}
			if rec.PagesRecorded != recordBudget {
				t.Fatalf("recorded %d pages, want the budget of %d (the guest touches 2048)", rec.PagesRecorded, recordBudget)
			}
			path, _ := m.layout.WorkingSet(key)
			st, _ := os.Stat(latestMemOrBase(t, m, first.ID))
			if r, err := prefetch.Load(path, key, st.Size()); err != nil || uint64(len(r.Pages)) != rec.PagesRecorded {
				t.Fatalf("recording on disk: %d pages, %v; want %d", len(r.Pages), err, rec.PagesRecorded)
			}
			verifyGuest(t, m, first.ID)
			// A File replay only prefetches what the page cache lacks.
			if err := m.DeleteInstance(context.Background(), first.ID); err != nil {
				t.Fatal(err)
			}
			dropPageCache(t, latestMem(t, m, src.ID))

			second := fork(t, m, "src", api.ForkRequest{Name: "second", TargetState: api.StateRunning})
			rep := waitPrefetch(t, m, second.ID)
			t.Logf("record %+v; replay %+v", rec, rep)
			if rep.Mode != "replay" || rep.PagesRecorded != rec.PagesRecorded || rep.Error != "" {
				t.Fatalf("later restore of the key: prefetch %+v, want a replay of %d pages", rep, rec.PagesRecorded)
			}
			if rep.PagesPrefetched < rec.PagesRecorded*3/4 || rep.WorkingSetMs <= 0 {
				t.Fatalf("replay %+v: want most of the recording prefetched and a time to working set", rep)
			}
			// The same workload uses what was recorded. (A File recording is
			// coarser, whole 2 MiB folios where the snapshot write left them,
			// and readahead merges ranges; with the budget cutting it at 4 MiB
			// that costs little here.)
			wantUsed := 0.9
			if float64(rep.PagesWasted) > (1-wantUsed)*float64(rep.PagesPrefetched) {
				t.Errorf("replay wasted %d of %d pages: the same workload should use %.0f%% or more",
					rep.PagesWasted, rep.PagesPrefetched, 100*wantUsed)
			}
			verifyGuest(t, m, second.ID)
			checkPrefetchMetrics(t, reg, backend, rec, rep)
		})
	}
}

// checkPrefetchMetrics: the forkd_prefetch_* metrics count one recording
// and one replay of backend with the figures the API showed. A restore is
// counted just after its figures are final, so this waits for the count.
func checkPrefetchMetrics(t *testing.T, reg *prometheus.Registry, backend string, rec, rep api.Prefetch) {
	t.Helper()
	type key struct{ name, label string }
	gather := func() map[key]float64 {
		fams, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		got := map[key]float64{}
		for _, f := range fams {
			for _, mm := range f.GetMetric() {
				labels := map[string]string{}
				for _, l := range mm.GetLabel() {
					labels[l.GetName()] = l.GetValue()
				}
				if labels["backend"] != backend {
					continue
				}
				switch f.GetName() {
				case "forkd_prefetch_restores_total":
					got[key{f.GetName(), labels["mode"]}] = mm.GetCounter().GetValue()
				case "forkd_prefetch_pages_total":
					got[key{f.GetName(), labels["kind"]}] = mm.GetCounter().GetValue()
				case "forkd_prefetch_working_set_seconds":
					got[key{f.GetName(), "count"}] = float64(mm.GetHistogram().GetSampleCount())
				}
			}
		}
		return got
	}
	var got map[key]float64
	deadline := time.Now().Add(30 * time.Second)
	for got = gather(); got[key{"forkd_prefetch_restores_total", "replay"}] < 1 && time.Now().Before(deadline); got = gather() {
		time.Sleep(10 * time.Millisecond)
	}
	want := map[key]float64{
		{"forkd_prefetch_restores_total", "record"}:     1,
		{"forkd_prefetch_restores_total", "replay"}:     1,
		{"forkd_prefetch_pages_total", "recorded"}:      float64(rec.PagesRecorded),
		{"forkd_prefetch_pages_total", "prefetched"}:    float64(rec.PagesPrefetched + rep.PagesPrefetched),
		{"forkd_prefetch_pages_total", "wasted"}:        float64(rec.PagesWasted + rep.PagesWasted),
		{"forkd_prefetch_working_set_seconds", "count"}: 1,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s{backend=%q, %s} = %v, want %v (the API's figures)", k.name, backend, k.label, got[k], v)
		}
	}
}

// latestMemOrBase is the mem-file of an instance in either state.
func latestMemOrBase(t *testing.T, m *Manager, id string) string {
	t.Helper()
	if p := latestMem(t, m, id); fileExists(p) {
		return p
	}
	return baseMem(t, m, id)
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// TestOnlyOneRestoreOfAKeyRecords: forks of one key restored at once do
// not all record: one does, the others say so and do nothing.
func TestOnlyOneRestoreOfAKeyRecords(t *testing.T) {
	m := newTestManager(t, withPrefetch(time.Second))
	prefetchSource(t, m)
	var ids []string
	for i := range 3 {
		ids = append(ids, fork(t, m, "src", api.ForkRequest{Name: fmt.Sprintf("f%d", i)}).ID)
	}
	// The recording restore keeps its claim until all three restores have
	// returned, however slowly the machine runs them: the test is about
	// restores that overlap a recording, not about how long one lasts.
	restored := make(chan struct{})
	m.faultHook = func(point string) {
		if point == "prefetch:release-claim" {
			<-restored
		}
	}
	var wg sync.WaitGroup
	for _, id := range ids {
		wg.Go(func() {
			if _, err := m.Action(context.Background(), id, "restore", api.ActionRequest{}); err != nil {
				t.Errorf("restore %s: %v", id, err)
			}
		})
	}
	wg.Wait()
	close(restored)
	modes := map[string]int{}
	for _, id := range ids {
		modes[waitPrefetch(t, m, id).Mode]++
	}
	if modes["record"] != 1 || modes["none"] != 2 {
		t.Fatalf("modes of 3 concurrent first restores: %v, want 1 record and 2 none", modes)
	}
}

// TestPrefetchOffDoesNothing: with prefetch off no restore records, replays
// or reports prefetch.
func TestPrefetchOffDoesNothing(t *testing.T) {
	m := newTestManager(t, func(c *Config) { c.Prefetch = PrefetchOff })
	prefetchSource(t, m)
	f := fork(t, m, "src", api.ForkRequest{Name: "f", TargetState: api.StateRunning})
	verifyGuest(t, m, f.ID)
	if in, _ := m.GetInstance(context.Background(), f.ID); in.Prefetch != nil {
		t.Fatalf("prefetch off: instance reports %+v", in.Prefetch)
	}
	if ents, _ := os.ReadDir(m.layout.PrefetchDir()); len(ents) != 0 {
		t.Fatalf("prefetch off: %d files in %s", len(ents), m.layout.PrefetchDir())
	}
}

// TestStaleRecordingIsNeverReplayed: a file under a key's name that records
// another key is removed and the key recorded afresh. The twin is a
// recording of the right key, which is replayed.
func TestStaleRecordingIsNeverReplayed(t *testing.T) {
	for _, tt := range []struct {
		name, inside, want string
	}{
		{"another key's recording", "ffffffffffffffffffffffff", "record"},
		{"twin: the key's own", "", "replay"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m := newTestManager(t, withPrefetch(time.Second))
			src := prefetchSource(t, m)
			key := src.SnapshotCacheKey
			inside := tt.inside
			if inside == "" {
				inside = key
			}
			st, err := os.Stat(latestMem(t, m, src.ID))
			if err != nil {
				t.Fatal(err)
			}
			// Written aside and renamed in: the daemon's collector removes
			// temp recordings no restore of its own is writing.
			path, _ := m.layout.WorkingSet(key)
			aside := filepath.Join(t.TempDir(), "rec.ws")
			if err := prefetch.Write(aside, prefetch.Recording{Key: inside, PageSize: 4096, FileSize: st.Size(),
				Source: prefetch.SourceFile, Pages: []uint64{0, 1, 2}}); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(aside, path); err != nil {
				t.Fatal(err)
			}
			f := fork(t, m, "src", api.ForkRequest{Name: "f", TargetState: api.StateRunning})
			if got := waitPrefetch(t, m, f.ID); got.Mode != tt.want {
				t.Fatalf("prefetch %+v, want mode %s", got, tt.want)
			}
			verifyGuest(t, m, f.ID)
		})
	}
}

// TestRecordingsNothingUsesAreRemoved: once no instance or snapshot holds a
// key, its recording goes, and so does a leftover temp file; files that are
// not recordings stay.
func TestRecordingsNothingUsesAreRemoved(t *testing.T) {
	m := newTestManager(t, withPrefetch(500*time.Millisecond))
	src := prefetchSource(t, m)
	f := fork(t, m, "src", api.ForkRequest{Name: "f", TargetState: api.StateRunning})
	waitPrefetch(t, m, f.ID)
	path, _ := m.layout.WorkingSet(src.SnapshotCacheKey)
	if !fileExists(path) {
		t.Fatalf("no recording at %s", path)
	}
	// The fork keeps the key (its base) while it runs.
	if err := m.DeleteInstance(context.Background(), "src"); err != nil {
		t.Fatal(err)
	}
	m.kickPrefetchGC()
	if err := m.gcRecordings(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !fileExists(path) {
		t.Fatal("the recording was removed while a fork still holds its key")
	}
	if err := m.DeleteInstance(context.Background(), f.ID); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for fileExists(path) {
		if time.Now().After(deadline) {
			t.Fatal("the recording of a key nothing holds is still there after 30 s")
		}
		time.Sleep(10 * time.Millisecond)
	}

	// A temp recording no restore is writing (a crash left it) goes too;
	// what is not a recording stays.
	tmp := filepath.Join(m.layout.PrefetchDir(), "0123456789abcdef01234567.ws.tmp")
	notes := filepath.Join(m.layout.PrefetchDir(), "notes.txt")
	for _, p := range []string{tmp, notes} {
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.gcRecordings(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tmp); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale temp recording still there (%v)", err)
	}
	if !fileExists(notes) {
		t.Error("a file that is not a recording was removed")
	}
}

// TestReplayedForksKeepDiscardedPagesZero: a guest that uses free pages as
// scratch and discards them (a balloon) runs clean on a Uffd replay of a
// recording that holds those pages: replay never installs data where the
// guest discarded (the deterministic twin is the pager's
// TestDiscardedPagesReadAsZeros).
func TestReplayedForksKeepDiscardedPagesZero(t *testing.T) {
	if _, err := os.Stat("/dev/userfaultfd"); err != nil {
		testenv.Need(t, testenv.Uffd, "no /dev/userfaultfd: "+err.Error())
	}
	m := newTestManager(t, withPrefetch(time.Second), func(c *Config) { c.ForkRestoreBackend = api.BackendUffd })
	src, err := m.CreateInstance(context.Background(), api.CreateInstanceRequest{
		Name: "src", MemoryMiB: testMemMiB, BootArgs: "forkd.ws_mib=4 forkd.rate=20000 forkd.write_pct=30 forkd.discard_pct=30",
	})
	if err != nil {
		t.Fatal(err)
	}
	verifyGuest(t, m, src.ID)
	action(t, m, "src", "standby")
	first := fork(t, m, "src", api.ForkRequest{Name: "first", TargetState: api.StateRunning})
	if rec := waitPrefetch(t, m, first.ID); rec.Mode != "record" || rec.PagesRecorded == 0 {
		t.Fatalf("first restore: %+v, want a recording", rec)
	}
	for i := range 3 {
		f := fork(t, m, "src", api.ForkRequest{Name: fmt.Sprintf("replay-%d", i), TargetState: api.StateRunning})
		if rep := waitPrefetch(t, m, f.ID); rep.Mode != "replay" || rep.PagesPrefetched == 0 {
			t.Fatalf("fork %d: %+v, want a replay", i, rep)
		}
		verifyGuest(t, m, f.ID)
	}
	raw, err := m.PagerStats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var removes struct {
		Removes uint64 `json:"removes"`
	}
	if err := json.Unmarshal(raw, &removes); err != nil || removes.Removes == 0 {
		t.Fatalf("pager removes %d (%v): want the guests to have discarded pages", removes.Removes, err)
	}
}
