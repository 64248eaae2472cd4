package instance

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
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
	execDB(t, dir, `DELETE FROM instances WHERE id = ?`, id)
	execDB(t, dir, `DELETE FROM journal WHERE subject = ?`, id)
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

// TestReconcileRestoresANetworkedForkWhoseCommitsWereLost: a networked
// fork's directory record holds the network slot its first commit took (a
// warm one here) and its publishes. When a power cut loses the fork's
// commits, and with them the take of the warm slot, the reconciler gives the
// fork that very slot again, out of the warm pool, with its publishes and
// its network whole, and it restores and runs in its own namespace. The
// twin, with the record's restore off, loses the fork: the record is what
// keeps it.
func TestReconcileRestoresANetworkedForkWhoseCommitsWereLost(t *testing.T) {
	for _, tc := range []struct {
		name string
		off  bool
	}{{"restored", false}, {"twin: record restore off", true}} {
		t.Run(tc.name, func(t *testing.T) {
			var env netEnv
			dir := shortDir(t)
			warm := func(c *Config) { c.NetworkWarm = 1 }
			pub := api.PortPublish{HostPort: 18080, GuestPort: 80, Protocol: "tcp"}
			var kid api.Instance
			var stored store.Instance
			warmSlot := -1
			openAndClose(t, dir, func(m *Manager) {
				ctx := context.Background()
				if _, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "src", MemoryMiB: testMemMiB, BootArgs: testBootArgs, Network: netOn()}); err != nil {
					t.Fatal(err)
				}
				action(t, m, "src", "standby")
				if err := m.waitWarm(ctxT(t), 1); err != nil {
					t.Fatal(err)
				}
				if ws, _ := m.db.WarmSlots(ctx); len(ws) == 1 && ws[0].Ready {
					warmSlot = ws[0].Slot
				}
				kid = fork(t, m, "src", api.ForkRequest{Name: "kid", Publish: []api.PortPublish{pub}})
				var err error
				if stored, err = m.db.GetInstance(ctx, kid.ID); err != nil {
					t.Fatal(err)
				}
			}, withNetwork(t, &env, ""), warm)
			if !stored.Networked || stored.NetSlot != warmSlot {
				t.Fatalf("the fork holds slot %d (networked %v); want the warm slot %d", stored.NetSlot, stored.Networked, warmSlot)
			}
			var r forkDirRecord
			if ok, err := dirrecord.Read(guestOf(t, dir, kid.ID).Jail, forkRecordKind, &r); err != nil || !ok {
				t.Fatalf("the networked fork's dir has no record: %v, %v", ok, err)
			}
			if r.Instance != stored || len(r.Publishes) != 1 || r.Publishes[0].HostPort != pub.HostPort {
				t.Fatalf("the dir's record\n%+v %+v\nis not the store's\n%+v with the publish %+v", r.Instance, r.Publishes, stored, pub)
			}
			// The store as the power cut leaves it: the fork's commits and
			// the refill after it lost, the warm slot the fork took warm.
			loseForkCommits(t, dir, kid.ID)
			execDB(t, dir, `DELETE FROM publishes WHERE instance_id = ?`, kid.ID)
			execDB(t, dir, `DELETE FROM net_warm`)
			execDB(t, dir, `INSERT INTO net_warm (slot, ready) VALUES (?, 1)`, warmSlot)
			if tc.off {
				t.Setenv(UnsafeNoForkRecordRestoreEnv, "1")
			}
			m := newManagerAt(t, dir, func(c *Config) { c.Network = reopen(t, &env) }, warm)
			ctx := context.Background()
			got, err := m.GetInstance(ctx, "kid")
			if tc.off {
				if err == nil {
					t.Fatalf("with the record's restore off the fork came back (%s): the test shows nothing", got.State)
				}
				return
			}
			if err != nil {
				t.Fatalf("the networked fork whose commits were lost did not come back: %v", err)
			}
			if got.State != api.StateStandby || got.Network.Address != kid.Network.Address || len(got.Publish) != 1 || got.Publish[0].HostPort != pub.HostPort {
				t.Fatalf("came back as %+v, want Standby at %s publishing %d", got, kid.Network.Address, pub.HostPort)
			}
			if ws, _ := m.db.WarmSlots(ctx); slices.ContainsFunc(ws, func(w store.WarmSlot) bool { return w.Slot == warmSlot }) {
				t.Fatalf("slot %d is both the fork's and warm: %v", warmSlot, ws)
			}
			got = action(t, m, "kid", "restore")
			checkNetworked(t, m, &env, got)
			verifyGuest(t, m, kid.ID)
		})
	}
}

// execDB runs one statement on the data dir's store, as a power cut's
// losses are simulated.
func execDB(t *testing.T, dir, q string, args ...any) {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "forkd.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(q, args...); err != nil {
		t.Fatalf("%s: %v", q, err)
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

// TestAFailedForkLosesItsNameBeforeItsFilesGo: a fork whose directory
// carries its record makes its one commit after its rename, so a failure
// after the rename (here an injected one) removes a dir that carries a
// record. The dir loses its own name before any file goes: a removal cut
// short must leave a temp dir, which the reconciler removes, never a
// half-removed fork it would take back. After the restart nothing of the
// fork is left. Its twin removes the dir in place
// (UnsafeRemoveForkInPlaceEnv) and the fork's own dir is still there while
// its files go.
func TestAFailedForkLosesItsNameBeforeItsFilesGo(t *testing.T) {
	for _, tc := range []struct {
		name string
		twin bool
	}{{"renamed aside", false}, {"twin: removed in place", true}} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.twin {
				t.Setenv(UnsafeRemoveForkInPlaceEnv, "1")
			}
			dir := shortDir(t)
			var named []string // the dirs under a VM's own name while the fork's files go
			openAndClose(t, dir, func(m *Manager) {
				if !m.fs.records {
					t.Fatalf("the data dir %s (%s) keeps no directory records: no fork makes one commit", dir, m.fs.fs)
				}
				createRunning(t, m, "src")
				action(t, m, "src", "standby")
				m.faults = map[string]error{"fork:renamed": errors.New("injected failure after the rename")}
				m.faultHook = func(point string) {
					if point != "fork:removing" {
						return
					}
					ents, err := os.ReadDir(m.layout.JailsDir())
					if err != nil {
						t.Error(err)
					}
					for _, e := range ents {
						if !strings.HasPrefix(e.Name(), ".") {
							named = append(named, e.Name())
						}
					}
				}
				_, err := m.ForkInstance(context.Background(), "src", api.ForkRequest{Name: "gone"})
				m.faults, m.faultHook = nil, nil
				if err == nil || !strings.Contains(err.Error(), "injected failure") {
					t.Fatalf("fork with a failure after its rename: %v; want the injected failure", err)
				}
			})
			if tc.twin {
				if len(named) < 2 {
					t.Fatalf("twin: dirs under their own names during the removal %v; want the fork's beside its source's", named)
				}
				return
			}
			if len(named) != 1 {
				t.Fatalf("dirs under their own names while the failed fork's files went: %v; want the source's alone", named)
			}
			m := newManagerAt(t, dir)
			if got, err := m.GetInstance(context.Background(), "gone"); err == nil {
				t.Fatalf("the failed fork came back after a restart: %+v", got)
			}
			if ents, _ := os.ReadDir(m.layout.JailsDir()); len(ents) != 1 {
				t.Errorf("%d entries in %s after the restart, want the source's alone", len(ents), m.layout.JailsDir())
			}
			if _, err := os.Stat(filepath.Join(dir, "lost+found")); err == nil {
				t.Errorf("something of the failed fork went to lost+found")
			}
		})
	}
}
