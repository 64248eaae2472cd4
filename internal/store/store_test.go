package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func openTemp(t testing.TB) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "forkd.db")
	s, err := Open(context.Background(), path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

func TestOpenAppliesMigrationsOnceAndUsesWAL(t *testing.T) {
	ctx := context.Background()
	s, path := openTemp(t)
	v, err := s.SchemaVersion(ctx)
	if err != nil || v != len(migrations) {
		t.Fatalf("SchemaVersion = %d, %v; want %d", v, err, len(migrations))
	}
	var mode string
	if err := s.db.QueryRowContext(ctx, `PRAGMA journal_mode`).Scan(&mode); err != nil || mode != "wal" {
		t.Fatalf("journal_mode = %q, %v; want wal", mode, err)
	}
	var sync int
	if err := s.db.QueryRowContext(ctx, `PRAGMA synchronous`).Scan(&sync); err != nil || sync != 2 {
		t.Fatalf("synchronous = %d, %v; want 2 (FULL)", sync, err)
	}
	s.Close()
	// Reopening must not re-run migrations (they would fail on existing tables).
	s2, err := Open(ctx, path)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s2.Close()
	if v, _ := s2.SchemaVersion(ctx); v != len(migrations) {
		t.Fatalf("SchemaVersion after reopen = %d", v)
	}
}

func TestOpenRefusesNewerSchema(t *testing.T) {
	ctx := context.Background()
	s, path := openTemp(t)
	if _, err := s.db.ExecContext(ctx, `UPDATE schema_version SET version = 999`); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if s2, err := Open(ctx, path); err == nil {
		s2.Close()
		t.Fatal("Open of a newer schema succeeded; want an error")
	}
}

func TestInstanceCRUDSurvivesReopen(t *testing.T) {
	ctx := context.Background()
	s, path := openTemp(t)
	in := Instance{ID: "a1", Name: "web", State: "Running", Vcpus: 2, MemoryMiB: 64,
		CreatedAt: time.Unix(100, 5).UTC(), Source: "snapshot:s1", SnapshotCacheKey: "k", Pid: 42, PagerSession: "sess"}
	if err := s.CreateInstance(ctx, in); err != nil {
		t.Fatal(err)
	}
	in.State = "Standby"
	in.Pid = 0
	in.VsockCID = 3
	in.HugePages = "2M"
	if err := s.UpdateInstance(ctx, in); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got, err := s.GetInstance(ctx, "a1")
	if err != nil {
		t.Fatal(err)
	}
	if got != in {
		t.Fatalf("GetInstance = %+v\nwant %+v", got, in)
	}
	list, _ := s.ListInstances(ctx)
	if len(list) != 1 {
		t.Fatalf("ListInstances = %d rows", len(list))
	}
	counts, _ := s.CountInstancesByState(ctx)
	if counts["Standby"] != 1 {
		t.Fatalf("counts = %v", counts)
	}
	if err := s.DeleteInstance(ctx, "a1"); err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"get":    func() error { _, err := s.GetInstance(ctx, "a1"); return err }(),
		"delete": s.DeleteInstance(ctx, "a1"),
		"update": s.UpdateInstance(ctx, in),
	} {
		if !errors.Is(err, ErrNotFound) {
			t.Errorf("%s of a deleted instance: err = %v, want ErrNotFound", name, err)
		}
	}
}

func TestInstanceNamesAreAdmittedOnce(t *testing.T) {
	ctx := context.Background()
	s, _ := openTemp(t)
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs[i] = s.CreateInstance(ctx, Instance{ID: string(rune('a' + i)), Name: "same", State: "Forking", Vcpus: 1, MemoryMiB: 32})
		}(i)
	}
	wg.Wait()
	won := 0
	for _, err := range errs {
		switch {
		case err == nil:
			won++
		case !errors.Is(err, ErrExists):
			t.Errorf("create: %v, want nil or ErrExists", err)
		}
	}
	if won != 1 {
		t.Fatalf("%d creates with one name succeeded, want exactly 1", won)
	}
}

func TestSnapshotCRUD(t *testing.T) {
	ctx := context.Background()
	s, _ := openTemp(t)
	sn := Snapshot{ID: "s1", Name: "golden", SourceInstance: "a1", CreatedAt: time.Unix(7, 0).UTC(),
		SizeBytes: 1 << 20, Compression: "none", State: "ready", SnapshotCacheKey: "k", MemoryMiB: 64, Vcpus: 1, VsockCID: 3, HugePages: "2M"}
	if err := s.CreateSnapshot(ctx, sn); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateSnapshot(ctx, Snapshot{ID: "s2", Name: "golden", State: "ready"}); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate snapshot name: err = %v, want ErrExists", err)
	}
	sn.State = "compressed"
	if err := s.UpdateSnapshot(ctx, sn); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetSnapshot(ctx, "s1")
	if err != nil || got != sn {
		t.Fatalf("GetSnapshot = %+v, %v\nwant %+v", got, err, sn)
	}
	if err := s.DeleteSnapshot(ctx, "s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetSnapshot(ctx, "s1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get deleted snapshot: %v", err)
	}
}

func TestJournalOpenEntriesAreWhatACrashLeft(t *testing.T) {
	ctx := context.Background()
	s, path := openTemp(t)
	done, err := s.Begin(ctx, "standby", "a1", map[string]string{"x": "1"})
	if err != nil {
		t.Fatal(err)
	}
	open, err := s.Begin(ctx, "fork", "b2", map[string]string{"source": "a1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Step(ctx, done, "snapshotted", nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Finish(ctx, done, "done"); err != nil {
		t.Fatal(err)
	}
	if err := s.Step(ctx, open, "files-made", map[string]string{"source": "a1", "tmp": "/x"}); err != nil {
		t.Fatal(err)
	}
	s.Close() // the "crash"
	s, err = Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	entries, err := s.OpenEntries(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].ID != open || entries[0].Kind != "fork" || entries[0].Step != "files-made" {
		t.Fatalf("OpenEntries = %+v, want only the fork at step files-made", entries)
	}
	var p map[string]string
	if err := json.Unmarshal(entries[0].Payload, &p); err != nil || p["tmp"] != "/x" {
		t.Fatalf("payload = %s, %v", entries[0].Payload, err)
	}
	all, _ := s.Entries(ctx, 10)
	if len(all) != 2 || all[1].Outcome != "done" || all[1].FinishedAt.IsZero() {
		t.Fatalf("Entries = %+v", all)
	}
}

func TestPruneJournalKeepsOpenAndNewest(t *testing.T) {
	ctx := context.Background()
	s, _ := openTemp(t)
	var ids []int64
	for i := 0; i < 5; i++ {
		id, err := s.Begin(ctx, "fork", "x", nil)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	for _, id := range ids[1:] { // ids[0] stays open
		s.Finish(ctx, id, "done")
	}
	n, err := s.PruneJournal(ctx, 2)
	if err != nil || n != 2 {
		t.Fatalf("PruneJournal = %d, %v; want 2 deleted", n, err)
	}
	all, _ := s.Entries(ctx, 10)
	if len(all) != 3 || all[0].ID != ids[4] || all[1].ID != ids[3] || all[2].ID != ids[0] {
		t.Fatalf("after prune: %+v; want the 2 newest finished and the open one", all)
	}
}

func TestEmptyMeansNothingWasEverRecorded(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		fill  func(s *Store) error
		empty bool
	}{
		{"new", func(*Store) error { return nil }, true},
		{"an instance", func(s *Store) error {
			return s.CreateInstance(ctx, Instance{ID: "a", Name: "a", State: "Created", Vcpus: 1, MemoryMiB: 16})
		}, false},
		{"a snapshot", func(s *Store) error {
			return s.CreateSnapshot(ctx, Snapshot{ID: "s", Name: "s", State: "ready", MemoryMiB: 16, Vcpus: 1})
		}, false},
		{"only a finished journal entry", func(s *Store) error {
			id, err := s.Begin(ctx, "delete", "a", nil)
			if err == nil {
				err = s.Finish(ctx, id, "done")
			}
			return err
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := openTemp(t)
			if err := tc.fill(s); err != nil {
				t.Fatal(err)
			}
			if empty, err := s.Empty(ctx); err != nil || empty != tc.empty {
				t.Errorf("Empty() = %v, %v; want %v", empty, err, tc.empty)
			}
		})
	}
}

func TestNamesFindsOpenAndFinishedSubjects(t *testing.T) {
	ctx := context.Background()
	s, _ := openTemp(t)
	if _, err := s.Begin(ctx, "fork", "open-one", nil); err != nil {
		t.Fatal(err)
	}
	done, _ := s.Begin(ctx, "create", "done-one", nil)
	s.Finish(ctx, done, "failed: x")
	for subject, want := range map[string]bool{"open-one": true, "done-one": true, "never": false, "%": false} {
		if got, err := s.Names(ctx, subject); err != nil || got != want {
			t.Errorf("Names(%q) = %v, %v; want %v", subject, got, err, want)
		}
	}
}

// TestAReferenceIsResolvedByIndexNotByScan: resolving a reference (every
// operation on an instance or snapshot does) looks the name and the id
// prefix up in their indexes; a scan of every record would make each
// operation cost as much as a list. The twin is the query as it was, with
// the prefix taken by substr(), which the plan shows as a scan.
func TestAReferenceIsResolvedByIndexNotByScan(t *testing.T) {
	s, _ := openTemp(t)
	ctx := context.Background()
	plan := func(q string, args ...any) string {
		rows, err := s.db.QueryContext(ctx, `EXPLAIN QUERY PLAN `+q, args...)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		var b strings.Builder
		for rows.Next() {
			var id, parent, unused int
			var detail string
			if err := rows.Scan(&id, &parent, &unused, &detail); err != nil {
				t.Fatal(err)
			}
			b.WriteString(detail + "; ")
		}
		return b.String()
	}
	for _, table := range []string{"instances", "snapshots"} {
		got := plan(`SELECT id FROM `+table+refMatch, refArgs("ab")...)
		if strings.Contains(got, "SCAN "+table) {
			t.Errorf("%s: resolving a reference scans the table: %s", table, got)
		}
		twin := plan(`SELECT id FROM `+table+refMatchByScan, "ab", "ab", "ab")
		if !strings.Contains(twin, "SCAN "+table) {
			t.Errorf("%s: the twin (prefix by substr) does not show a scan, so the check cannot fail: %s", table, twin)
		}
	}
}

// refMatchByScan is refMatch as it was, the id prefix taken with substr(),
// which no index serves: the twin of the plan test and the benchmark's
// baseline.
const refMatchByScan = ` WHERE name = ? OR substr(id, 1, length(?)) = ? ORDER BY created_at, id`

// TestIDPrefixRangeHoldsExactlyTheIDsWithThePrefix checks the range the
// lookup uses against the plain definition, over ids and references of
// forkd's alphabet and beyond it.
func TestIDPrefixRangeHoldsExactlyTheIDsWithThePrefix(t *testing.T) {
	ids := []string{"a", "ab", "ab0", "abf", "abff", "ac", "b", "0123456789abcdef01234567", "0123456789abcdef0123456f", "0123456789abcdef1"}
	refs := []string{"", "a", "ab", "abf", "0123456789abcdef0", "0123456789abcdef01234567", "web", "z", "ab~", "é"}
	for _, ref := range refs {
		for _, id := range ids {
			in := id >= ref && id < idPrefixEnd(ref)
			if want := strings.HasPrefix(id, ref); in != want {
				t.Errorf("ref %q, id %q: in the range %v, has the prefix %v", ref, id, in, want)
			}
		}
	}
}

func TestCacheKeysInUseAreEveryRecordsKeyOnce(t *testing.T) {
	ctx := context.Background()
	s, _ := openTemp(t)
	if keys, err := s.CacheKeysInUse(ctx); err != nil || len(keys) != 0 {
		t.Fatalf("empty store: keys %v, %v; want none", keys, err)
	}
	for i, key := range []string{"k1", "k1", "k2", ""} {
		in := Instance{ID: fmt.Sprintf("i%d", i), Name: fmt.Sprintf("vm%d", i), State: "Standby", SnapshotCacheKey: key, CreatedAt: time.Unix(int64(i), 0).UTC()}
		if err := s.CreateInstance(ctx, in); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.CreateSnapshot(ctx, Snapshot{ID: "s1", Name: "golden", State: "ready", SnapshotCacheKey: "k3"}); err != nil {
		t.Fatal(err)
	}
	keys, err := s.CacheKeysInUse(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{"k1": true, "k2": true, "k3": true, "": true}
	if !maps.Equal(keys, want) {
		t.Fatalf("keys %v, want %v", keys, want)
	}
	if err := s.DeleteInstance(ctx, "i2"); err != nil {
		t.Fatal(err)
	}
	if keys, err = s.CacheKeysInUse(ctx); err != nil || keys["k2"] || !keys["k1"] {
		t.Fatalf("after deleting k2's only instance: keys %v, %v; want k1 and no k2", keys, err)
	}
}
