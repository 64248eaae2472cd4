package store

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"testing"
	"time"
)

// cacheMismatches compares every read the cache answers with the same read
// of the database, for each of ids (instances and snapshots) and refs.
func cacheMismatches(t *testing.T, s *Store, ids, refs []string) []string {
	t.Helper()
	ctx := context.Background()
	var out []string
	for _, id := range ids {
		in, err := s.GetInstance(ctx, id)
		want, werr := s.getInstanceSQL(ctx, id)
		if errors.Is(err, ErrNotFound) != errors.Is(werr, ErrNotFound) || !reflect.DeepEqual(in, want) {
			out = append(out, fmt.Sprintf("instance %s: cache %+v (%v), database %+v (%v)", id, in, err, want, werr))
		}
		sn, err := s.GetSnapshot(ctx, id)
		wantSn, werr := s.getSnapshotSQL(ctx, id)
		if errors.Is(err, ErrNotFound) != errors.Is(werr, ErrNotFound) || !reflect.DeepEqual(sn, wantSn) {
			out = append(out, fmt.Sprintf("snapshot %s: cache %+v (%v), database %+v (%v)", id, sn, err, wantSn, werr))
		}
	}
	for _, ref := range refs {
		ins, _ := s.InstancesMatching(ctx, ref)
		wantIns, err := s.instancesMatchingSQL(ctx, ref)
		if err != nil {
			t.Fatal(err)
		}
		if len(ins)+len(wantIns) > 0 && !reflect.DeepEqual(ins, wantIns) {
			out = append(out, fmt.Sprintf("instances matching %q: cache %+v, database %+v", ref, ins, wantIns))
		}
		sns, _ := s.SnapshotsMatching(ctx, ref)
		wantSns, err := s.snapshotsMatchingSQL(ctx, ref)
		if err != nil {
			t.Fatal(err)
		}
		if len(sns)+len(wantSns) > 0 && !reflect.DeepEqual(sns, wantSns) {
			out = append(out, fmt.Sprintf("snapshots matching %q: cache %+v, database %+v", ref, sns, wantSns))
		}
	}
	return out
}

// TestTheCacheAnswersAsTheDatabaseDoes writes records by every write path
// (a statement's own, a networked create and restore, group units, a unit
// that fails, a GroupAfter unit rolled back, taken names) and, after each
// write, requires every read the cache answers (an id, a reference: a
// name, an id, a prefix, an ambiguous prefix) to equal the same read of the
// database; and the same after a reopen, which loads the cache. Its twin
// keeps a group's changes out of the cache, as a write path that forgot it
// would, and the comparison must catch it.
func TestTheCacheAnswersAsTheDatabaseDoes(t *testing.T) {
	for _, twin := range []bool{false, true} {
		t.Run(fmt.Sprintf("twin=%v", twin), func(t *testing.T) {
			if twin {
				unsafeCacheSkips = func(c Change) bool { return c.Instance != nil && c.Instance.ID == "aa03" }
				defer func() { unsafeCacheSkips = nil }()
			}
			ctx := context.Background()
			s, path := openTemp(t)
			ids := []string{"aa01", "aa02", "aa03", "ab04", "bb05", "cc06", "cc07"}
			refs := []string{"aa01", "a", "aa", "ab", "web", "db", "bb05", "snap", "c", "nothing", ""}
			var found []string
			check := func(step string) {
				for _, m := range cacheMismatches(t, s, ids, refs) {
					found = append(found, step+": "+m)
				}
			}
			at := time.Date(2026, 12, 3, 10, 0, 0, 123456789, time.FixedZone("x", 3600)) // not UTC, with nanoseconds
			web := Instance{ID: "aa01", Name: "web", State: "Running", Vcpus: 2, MemoryMiB: 64, CreatedAt: at}
			if err := s.CreateInstance(ctx, web); err != nil {
				t.Fatal(err)
			}
			check("create")
			if err := s.CreateInstance(ctx, Instance{ID: "aa09", Name: "web", CreatedAt: at}); !errors.Is(err, ErrExists) {
				t.Fatalf("a taken name: %v", err)
			}
			check("taken name")
			web.State, web.Pid, web.Error = "Stopped", 0, "it stopped"
			if err := s.UpdateInstance(ctx, web); err != nil {
				t.Fatal(err)
			}
			check("update")
			db := Instance{ID: "aa02", Name: "db", State: "Created", CreatedAt: at, NetGuest: "198.18.0.2/30", NetMAC: "02:fc:00:00:00:02"}
			if err := s.CreateNetworkedInstance(ctx, &db, 8, nil); err != nil {
				t.Fatal(err)
			}
			check("networked create")
			// Group units: one kept, one that fails (rolled back alone).
			err := s.Group(ctx, "kept", func(tx *Tx) error {
				return tx.CreateInstance(Instance{ID: "aa03", Name: "kid", State: "Standby", CreatedAt: at.Add(time.Second), Source: "instance:aa01"})
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Group(ctx, "failed", func(tx *Tx) error {
				if err := tx.CreateInstance(Instance{ID: "ab04", Name: "lost", CreatedAt: at}); err != nil {
					return err
				}
				return errors.New("the unit fails")
			}); err == nil {
				t.Fatal("a failing unit succeeded")
			}
			check("group units")
			ready := make(chan error, 1)
			ready <- errors.New("not durable")
			if err := s.GroupAfter(ctx, "after", After{Ready: ready, Unsynced: true}, func(tx *Tx) error {
				return tx.CreateInstance(Instance{ID: "ab04", Name: "after", CreatedAt: at})
			}); err == nil {
				t.Fatal("a unit rolled back by its go-ahead succeeded")
			}
			check("group after, rolled back")
			if err := s.GroupUnsynced(ctx, "unsynced", func(tx *Tx) error {
				if err := tx.UpdateInstance(Instance{ID: "aa03", Name: "kid", State: "Running", CreatedAt: at.Add(time.Second), Pid: 42}); err != nil {
					return err
				}
				return tx.DeleteInstance("aa01")
			}); err != nil {
				t.Fatal(err)
			}
			check("group unsynced: update and delete")
			restored := Instance{ID: "bb05", Name: "back", State: "Standby", CreatedAt: at, Networked: true, NetSlot: 5, NetGuest: "198.18.0.6/30"}
			if err := s.RestoreNetworkedInstance(ctx, restored, 8, nil); err != nil {
				t.Fatal(err)
			}
			check("networked restore")
			for i, id := range []string{"cc06", "cc07"} {
				if err := s.CreateSnapshot(ctx, Snapshot{ID: id, Name: fmt.Sprintf("snap%d", i), CreatedAt: at.Add(-time.Duration(i) * time.Minute), State: "ready", MemoryMiB: 64}); err != nil {
					t.Fatal(err)
				}
			}
			check("snapshots")
			if err := s.UpdateSnapshot(ctx, Snapshot{ID: "cc06", Name: "snap", CreatedAt: at, State: "compressed", Compression: "zstd", SizeBytes: 7}); err != nil {
				t.Fatal(err)
			}
			if err := s.DeleteSnapshot(ctx, "cc07"); err != nil {
				t.Fatal(err)
			}
			check("snapshot update and delete")
			if twin {
				if len(found) == 0 {
					t.Fatal("twin: the cache missed a group's changes and the comparison found nothing")
				}
				return
			}
			for _, f := range found {
				t.Error(f)
			}
			found = nil
			s.Close()
			if s, err = Open(ctx, path); err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			check("reopened")
			for _, f := range found {
				t.Error(f)
			}
		})
	}
}
