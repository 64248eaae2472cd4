package instance

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/store"
)

// toLegacyLayout puts instance id's dir back where the layout before jails
// kept it: <data>/guests/<id>/, with the VMM's log in its logs/vmm.log. A
// VMM running in it keeps running: its working directory and log file move
// with the directory.
func toLegacyLayout(t *testing.T, dir, id string) {
	t.Helper()
	l, _ := guestdir.New(dir)
	g, _ := l.Guest(id)
	legacy, log, _ := l.LegacyGuest(id)
	if err := os.MkdirAll(l.LegacyGuestsDir(), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(g.Dir, legacy); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(log), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(g.VMMLog(), log); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	if err := os.Remove(g.Jail); err != nil {
		t.Fatal(err)
	}
}

// A data dir written before jails is migrated at start: every guest dir
// moves from guests/<id>/ to jail/<exec>/<id>/root/ (its log beside it), by
// rename, so inodes and link counts hold; a VMM running from before the
// upgrade keeps running and is adopted; guests/ goes once empty. Forkd's
// temp dirs there are removed, a dir nothing names goes to lost+found, and
// names that are not forkd's are left alone (so guests/ stays).
func TestStartMigratesTheLayoutBeforeJails(t *testing.T) {
	dir := shortDir(t)
	ctx := context.Background()
	var running, parked, kid, stopped api.Instance
	openAndClose(t, dir, func(m *Manager) {
		running = createRunning(t, m, "running")
		verifyGuest(t, m, running.ID)
		parked = createRunning(t, m, "parked")
		action(t, m, "parked", "standby")
		kid = fork(t, m, "parked", api.ForkRequest{Name: "kid"})
		var err error
		if stopped, err = m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "stopped", MemoryMiB: testMemMiB, Start: new(bool)}); err != nil {
			t.Fatal(err)
		}
	})
	t.Cleanup(func() { syscall.Kill(running.Pid, syscall.SIGKILL) })
	l, _ := guestdir.New(dir)
	pg, _ := l.Guest(parked.ID)
	before := fingerprint(t, pg.Latest().Memory())
	for _, id := range []string{running.ID, parked.ID, kid.ID, stopped.ID} {
		toLegacyLayout(t, dir, id)
	}
	if err := os.Remove(l.JailsDir()); err != nil {
		t.Fatal(err)
	}
	old := l.LegacyGuestsDir()
	stranger, tmp := newID(), filepath.Join(old, ".tmp-"+newID())
	plant(t, filepath.Join(old, stranger, "kernel"))
	plant(t, filepath.Join(tmp, "rootfs.ext4"))

	m := newManagerAt(t, dir)
	for _, in := range []api.Instance{running, parked, kid, stopped} {
		g, _ := m.layout.Guest(in.ID)
		if st, err := os.Stat(g.Rootfs()); err != nil || !st.Mode().IsRegular() {
			t.Errorf("%s: disk not at %s after the migration: %v", in.Name, g.Rootfs(), err)
		}
		if _, err := os.Stat(filepath.Join(g.Dir, "logs")); err == nil {
			t.Errorf("%s: logs/ still in the guest dir: the log belongs beside it", in.Name)
		}
	}
	g, _ := m.layout.Guest(running.ID)
	if st, err := os.Stat(g.VMMLog()); err != nil || st.Size() == 0 {
		t.Errorf("the running VM's log was not moved beside its guest dir: %v", err)
	}
	in, err := m.GetInstance(ctx, "running")
	if err != nil || in.State != api.StateRunning || in.Pid != running.Pid {
		t.Fatalf("the VM running across the upgrade: %+v, %v; want Running on pid %d (adopted)", in, err, running.Pid)
	}
	verifyGuest(t, m, running.ID)
	pg, _ = m.layout.Guest(parked.ID)
	kg, _ := m.layout.Guest(kid.ID)
	if after, forkMem := fingerprint(t, pg.Latest().Memory()), fingerprint(t, kg.Latest().Memory()); after != before || forkMem.ino != before.ino {
		t.Errorf("mem-file changed by the migration: before %+v, after %+v, the fork's %+v (want one inode, same bytes and links)", before, after, forkMem)
	}
	if exists(old) {
		t.Errorf("%s still exists with only forkd's entries in it", old)
	}
	if exists(tmp) {
		t.Errorf("temp dir %s of the old layout was not removed", tmp)
	}
	if !exists(filepath.Join(dir, "lost+found", "guests", stranger, "kernel")) {
		t.Errorf("a dir no record or journal names was not moved to lost+found/guests")
	}
	all, err := m.db.Entries(ctx, 1000)
	if err != nil {
		t.Fatal(err)
	}
	migrated := 0
	for _, e := range all {
		if e.Kind != "migrate" {
			continue
		}
		migrated++
		if e.Step != "moved" || e.Outcome != "done" {
			t.Errorf("migrate entry %+v: want step moved, outcome done", e)
		}
	}
	if migrated != 4 {
		t.Errorf("%d migrate journal entries, want one per recorded guest (4)", migrated)
	}
	// Everything works from the new place: the adopted VM stands by and
	// restores, jailed paths and all.
	action(t, m, "running", "standby")
	action(t, m, "running", "restore")
	verifyGuest(t, m, running.ID)
	action(t, m, "parked", "restore")
	verifyGuest(t, m, parked.ID)
	action(t, m, "stopped", "start")
}

// A stranger's file left in guests/ keeps guests/ (forkd never removes what
// is not its own), and the guests forkd knows still move.
func TestMigrationLeavesStrangersAlone(t *testing.T) {
	dir := shortDir(t)
	var vm api.Instance
	openAndClose(t, dir, func(m *Manager) {
		var err error
		if vm, err = m.CreateInstance(context.Background(), api.CreateInstanceRequest{Name: "vm", MemoryMiB: testMemMiB, Start: new(bool)}); err != nil {
			t.Fatal(err)
		}
	})
	toLegacyLayout(t, dir, vm.ID)
	notes := filepath.Join(dir, "guests", "notes.txt")
	plant(t, notes)
	m := newManagerAt(t, dir)
	if b, err := os.ReadFile(notes); err != nil || string(b) != "someone's data\n" {
		t.Errorf("%s touched by the migration: %q, %v", notes, b, err)
	}
	if _, err := m.GetInstance(context.Background(), "vm"); err != nil {
		t.Fatal(err)
	}
	g, _ := m.layout.Guest(vm.ID)
	if !exists(g.Rootfs()) {
		t.Errorf("the known guest did not move")
	}
}

// A crash in the middle of a migration (its jail dir made, the guest dir
// not yet renamed into it; or renamed, the log not yet moved) is finished
// at the next start from the open journal entry.
func TestInterruptedMigrationIsFinished(t *testing.T) {
	for _, tc := range []struct {
		name  string
		step  string
		state func(t *testing.T, l guestdir.Layout, id string)
	}{
		{"begun, jail dir made", "begun", func(t *testing.T, l guestdir.Layout, id string) {
			g, _ := l.Guest(id)
			if err := os.MkdirAll(g.Jail, 0o700); err != nil {
				t.Fatal(err)
			}
		}},
		{"begun, dir renamed, log not moved", "begun", func(t *testing.T, l guestdir.Layout, id string) {
			g, _ := l.Guest(id)
			legacy, _, _ := l.LegacyGuest(id)
			os.MkdirAll(g.Jail, 0o700)
			if err := os.Rename(legacy, g.Dir); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortDir(t)
			ctx := context.Background()
			var vm api.Instance
			openAndClose(t, dir, func(m *Manager) {
				vm = createRunning(t, m, "vm")
				action(t, m, "vm", "standby")
			})
			toLegacyLayout(t, dir, vm.ID)
			l, _ := guestdir.New(dir)
			legacy, _, _ := l.LegacyGuest(vm.ID)
			db, err := store.Open(ctx, filepath.Join(dir, "forkd.db"))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := db.Begin(ctx, "migrate", vm.ID, opPayload{Source: legacy}); err != nil {
				t.Fatal(err)
			}
			db.Close()
			tc.state(t, l, vm.ID)

			m := newManagerAt(t, dir)
			g, _ := m.layout.Guest(vm.ID)
			if !exists(g.Latest().Memory()) || exists(legacy) || exists(filepath.Join(g.Dir, "logs")) {
				t.Fatalf("interrupted migration not finished: memory %v, old dir %v, logs/ in root %v",
					exists(g.Latest().Memory()), exists(legacy), exists(filepath.Join(g.Dir, "logs")))
			}
			if !exists(g.VMMLog()) {
				t.Errorf("log not moved beside the guest dir")
			}
			open, _ := m.db.OpenEntries(ctx)
			for _, e := range open {
				if e.Kind == "migrate" {
					t.Errorf("migrate entry left open: %+v", e)
				}
			}
			action(t, m, "vm", "restore")
			verifyGuest(t, m, vm.ID)
		})
	}
}

// A data dir a daemon of the other VMM kind used holds its guests under
// jail/firecracker/: they move under this daemon's exec name whole.
func TestStartMovesGuestsOfTheOtherVMMKind(t *testing.T) {
	dir := shortDir(t)
	var vm api.Instance
	openAndClose(t, dir, func(m *Manager) {
		vm = createRunning(t, m, "vm")
		action(t, m, "vm", "standby")
	})
	l, _ := guestdir.New(dir)
	g, _ := l.Guest(vm.ID)
	fc, _ := l.WithExec(guestdir.ExecFirecracker)
	other, _ := fc.Guest(vm.ID)
	os.MkdirAll(fc.JailsDir(), 0o700)
	if err := os.Rename(g.Jail, other.Jail); err != nil {
		t.Fatal(err)
	}
	m := newManagerAt(t, dir)
	if !exists(g.Latest().Memory()) || exists(fc.JailsDir()) {
		t.Fatalf("guest of the other VMM kind not moved (memory here %v, jail/firecracker left %v)", exists(g.Latest().Memory()), exists(fc.JailsDir()))
	}
	action(t, m, "vm", "restore")
	verifyGuest(t, m, vm.ID)
}

// The start guard sees the old layout too: a lost store while guests/
// holds forkd's dirs is refused, and nothing moves.
func TestLostStoreWithTheOldLayoutIsRefused(t *testing.T) {
	dir := shortDir(t)
	pid := populated(t, dir)
	ids, _ := os.ReadDir(filepath.Join(dir, "jail", "forkd-vmm"))
	for _, e := range ids {
		toLegacyLayout(t, dir, e.Name())
	}
	if err := os.Truncate(filepath.Join(dir, "forkd.db"), 0); err != nil {
		t.Fatal(err)
	}
	before := treeOf(t, filepath.Join(dir, "guests"))
	m, err := newManagerErr(t, dir)
	if err == nil {
		m.Close()
		t.Fatal("New started over a lost store while guests/ holds forkd's dirs")
	}
	if !errors.Is(err, ErrStoreLost) || !strings.Contains(err.Error(), "guests/") {
		t.Errorf("New: %v; want ErrStoreLost naming guests/", err)
	}
	if !strings.Contains(err.Error(), "pids ["+strconv.Itoa(pid)) {
		t.Errorf("the refusal does not name the VMM still running (pid %d): %v", pid, err)
	}
	sameTree(t, "guests/", before, treeOf(t, filepath.Join(dir, "guests")))
}
