package instance

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	_ "modernc.org/sqlite"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/dirrecord"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/store"
)

// loseForkCommits does to the store what a power cut does to a fork whose
// two commits were never fsynced: its record and its journal entry are
// gone, its directory stays (its rename was durable).
func loseForkCommits(t *testing.T, dir, id string) {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "forkd.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, q := range []string{`DELETE FROM instances WHERE id = ?`, `DELETE FROM journal WHERE subject = ?`} {
		if _, err := db.Exec(q, id); err != nil {
			t.Fatal(err)
		}
	}
}

// forkOfStandbyIn makes, in a data dir dir, a Standby source "src" and its
// fork "kid" (each test's daemon stops after, leaving them in place), and
// returns the fork; more, when set, runs on the same manager after it.
func forkOfStandbyIn(t *testing.T, dir string, more func(m *Manager, kid api.Instance)) api.Instance {
	t.Helper()
	var kid api.Instance
	openAndClose(t, dir, func(m *Manager) {
		createRunning(t, m, "src")
		action(t, m, "src", "standby")
		kid = fork(t, m, "src", api.ForkRequest{Name: "kid"})
		if more != nil {
			more(m, kid)
		}
	})
	return kid
}

// TestAForkCarriesItsOwnRecord: a fork's directory holds its finished
// record (dirrecord), identical to what the store holds, so a power cut
// that loses the fork's unsynced commits loses nothing the fork needs.
func TestAForkCarriesItsOwnRecord(t *testing.T) {
	dir := shortDir(t)
	var stored store.Instance
	kid := forkOfStandbyIn(t, dir, func(m *Manager, kid api.Instance) {
		if !m.fs.records {
			t.Fatalf("the data dir %s (%s) keeps no directory records: forks would wait for a synced commit", dir, m.fs.fs)
		}
		var err error
		if stored, err = m.db.GetInstance(context.Background(), kid.ID); err != nil {
			t.Fatal(err)
		}
	})
	g := guestOf(t, dir, kid.ID)
	var r forkDirRecord
	if ok, err := dirrecord.Read(g.Jail, forkRecordKind, &r); err != nil || !ok {
		t.Fatalf("the fork's dir %s: record %v, %v; want its own", g.Jail, ok, err)
	}
	if err := r.describes(g); err != nil {
		t.Errorf("the fork's record does not describe its own dir: %v", err)
	}
	rec := r.Instance
	if !rec.CreatedAt.Equal(stored.CreatedAt) {
		t.Errorf("the record's created_at %v, the store's %v", rec.CreatedAt, stored.CreatedAt)
	}
	rec.CreatedAt = stored.CreatedAt
	if rec != stored {
		t.Fatalf("the dir's record\n%+v\nis not the store's\n%+v", rec, stored)
	}
}

// TestReconcileRestoresAForkWhoseCommitsWereLost: a fork whose record and
// journal entry a power cut lost comes back from its directory's record,
// Standby and whole (its memory verified after a restore). Its twin, with
// the roll-forward switched off, sets the fork's dir aside in lost+found
// instead: the record is what keeps the fork.
func TestReconcileRestoresAForkWhoseCommitsWereLost(t *testing.T) {
	for _, tc := range []struct {
		name string
		off  bool
	}{{"restored", false}, {"twin: roll-forward off", true}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortDir(t)
			kid := forkOfStandbyIn(t, dir, nil)
			loseForkCommits(t, dir, kid.ID)
			if tc.off {
				t.Setenv(UnsafeNoForkRollForwardEnv, "1")
			}
			m := newManagerAt(t, dir)
			got, err := m.GetInstance(context.Background(), "kid")
			if tc.off {
				if err == nil {
					t.Fatalf("with the roll-forward off the fork came back (%s): the record is not what the test thinks", got.State)
				}
				if _, err := os.Stat(filepath.Join(dir, "lost+found")); err != nil {
					t.Fatalf("the fork's dir was not set aside: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("the fork whose commits were lost did not come back: %v", err)
			}
			if got.ID != kid.ID || got.State != api.StateStandby || got.ForkMode != kid.ForkMode || got.SnapshotCacheKey != kid.SnapshotCacheKey {
				t.Fatalf("came back as %+v, want %+v", got, kid)
			}
			action(t, m, "kid", "restore")
			verifyGuest(t, m, kid.ID)
		})
	}
}

// TestReconcileRestoresNoRecordTheJournalDisowns: a fork that failed after
// its rename had its record deleted and its journal entry closed; a power
// cut that then lost the removal of its dir must not bring it back from the
// dir's record: the journal names it, so the dir goes.
func TestReconcileRestoresNoRecordTheJournalDisowns(t *testing.T) {
	dir := shortDir(t)
	kid := forkOfStandbyIn(t, dir, func(m *Manager, kid api.Instance) {
		if err := m.db.DeleteInstance(context.Background(), kid.ID); err != nil { // the failed fork's rollback
			t.Fatal(err)
		}
	})
	g := guestOf(t, dir, kid.ID)
	m := newManagerAt(t, dir)
	if in, err := m.GetInstance(context.Background(), kid.ID); err == nil {
		t.Fatalf("a fork the journal disowns came back from its dir's record (%s)", in.State)
	}
	if _, err := os.Stat(g.Jail); !os.IsNotExist(err) {
		t.Fatalf("its dir %s: %v; want it removed", g.Jail, err)
	}
}

// TestReconcileTakesNoRecordOfAnotherDir: a record that names another id
// (copied or planted) restores nothing; the dir is set aside.
func TestReconcileTakesNoRecordOfAnotherDir(t *testing.T) {
	dir := shortDir(t)
	kid := forkOfStandbyIn(t, dir, nil)
	loseForkCommits(t, dir, kid.ID)
	g := guestOf(t, dir, kid.ID)
	var r forkDirRecord
	if _, err := dirrecord.Read(g.Jail, forkRecordKind, &r); err != nil {
		t.Fatal(err)
	}
	r.Instance.ID = newID()
	if err := dirrecord.Write(g.Jail, forkRecordKind, r); err != nil {
		t.Fatal(err)
	}
	m := newManagerAt(t, dir)
	for _, ref := range []string{"kid", kid.ID, r.Instance.ID} {
		if in, err := m.GetInstance(context.Background(), ref); err == nil {
			t.Fatalf("%s came back (%s %s) from a record naming another dir", ref, in.ID, in.State)
		}
	}
	if _, err := os.Stat(g.Jail); !os.IsNotExist(err) {
		t.Fatalf("the dir %s stayed in place: %v; want it in lost+found", g.Jail, err)
	}
}

// TestReconcileTakesNoStaleRecord: a fork that has run and stood by since
// it was made has new files, and its record from the fork no longer
// describes them; a store that lacks the fork (one restored from an older
// backup) must not get it back from that record, with the old cache key
// (the pager would serve the old snapshot's pages for the new one). Its
// twin takes the record back without the check: the fork comes back with
// a cache key that is not its files'.
func TestReconcileTakesNoStaleRecord(t *testing.T) {
	for _, twin := range []bool{false, true} {
		t.Run(fmt.Sprintf("check-off=%v", twin), func(t *testing.T) {
			dir := shortDir(t)
			var ranKey string
			kid := forkOfStandbyIn(t, dir, func(m *Manager, kid api.Instance) {
				action(t, m, "kid", "restore")
				ranKey = action(t, m, "kid", "standby").SnapshotCacheKey
			})
			if ranKey == kid.SnapshotCacheKey {
				t.Fatalf("the fork's standby kept its cache key %s: the test would show nothing", ranKey)
			}
			loseForkCommits(t, dir, kid.ID) // its record and every journal entry naming it
			if twin {
				t.Setenv(UnsafeStaleForkRecordEnv, "1")
			}
			m := newManagerAt(t, dir)
			got, err := m.GetInstance(context.Background(), kid.ID)
			if twin {
				if err != nil || got.SnapshotCacheKey != kid.SnapshotCacheKey {
					t.Fatalf("twin: %+v, %v; want the fork back with its stale key %s", got, err, kid.SnapshotCacheKey)
				}
				return
			}
			if err == nil {
				t.Fatalf("the fork came back from a stale record: %s, cache key %s (its files' %s)", got.State, got.SnapshotCacheKey, ranKey)
			}
			g := guestOf(t, dir, kid.ID)
			if _, err := os.Stat(g.Jail); !os.IsNotExist(err) {
				t.Fatalf("the dir %s stayed in place: %v; want it in lost+found", g.Jail, err)
			}
		})
	}
}

// guestOf is instance id's guest dir in the data dir dir.
func guestOf(t *testing.T, dir, id string) guestdir.Guest {
	t.Helper()
	layout, err := guestdir.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	g, err := layout.Guest(id)
	if err != nil {
		t.Fatal(err)
	}
	return g
}
