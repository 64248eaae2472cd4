package instance

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/dirrecord"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/memfile"
	"github.com/forkd/forkd/internal/store"
	"github.com/forkd/forkd/internal/testenv"
)

// openAndClose runs fn on a manager over dir and closes it WITHOUT deleting
// its instances: a daemon that stops (or dies) while its VMs keep running.
func openAndClose(t *testing.T, dir string, fn func(m *Manager), opts ...testOpt) {
	t.Helper()
	cfg := Config{
		DataDir: dir,
		VMM:     VMMSpec{Binary: forkdBinary(t), Args: testenv.EmulatorArgs(), Emulator: true},
		Jail:    testJail(t, dir),
		// Never this test binary: started as a pager it would run the tests.
		PagerBinary: forkdBinary(t),
		Logger:      slog.New(slog.NewTextHandler(testWriter{t}, nil)),
	}
	for _, o := range opts {
		o(&cfg)
	}
	m, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	fn(m)
	m.Close()
}

func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "fk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestRestartReadoptsRunningVMM(t *testing.T) {
	dir := shortDir(t)
	var before api.Instance
	openAndClose(t, dir, func(m *Manager) {
		before = createRunning(t, m, "vm")
		verifyGuest(t, m, before.ID)
	})
	m := newManagerAt(t, dir)
	in, err := m.GetInstance(context.Background(), "vm")
	if err != nil {
		t.Fatal(err)
	}
	if in.State != api.StateRunning || in.Pid != before.Pid {
		t.Fatalf("after restart: state %s pid %d; want Running pid %d (the VMM outlives the daemon)", in.State, in.Pid, before.Pid)
	}
	verifyGuest(t, m, in.ID)
	action(t, m, "vm", "standby")
	if processAlive(before.Pid) {
		t.Fatalf("adopted VMM pid %d still alive after standby", before.Pid)
	}
	action(t, m, "vm", "restore")
	verifyGuest(t, m, in.ID)
}

func TestReconcileSettlesInstancesWhoseVMMDied(t *testing.T) {
	dir := shortDir(t)
	var running, standingBy api.Instance
	openAndClose(t, dir, func(m *Manager) {
		running = createRunning(t, m, "running")
		standingBy = createRunning(t, m, "standingby")
		action(t, m, "standingby", "standby")
	})
	// Kill the running VMM while no daemon runs.
	if err := syscall.Kill(running.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitDead(t, running.Pid)
	// A standby that crashed after its snapshot was durable: the record
	// still says Standingby and the journal entry is open at "created".
	db, err := store.Open(context.Background(), filepath.Join(dir, "forkd.db"))
	if err != nil {
		t.Fatal(err)
	}
	rec, _ := db.GetInstance(context.Background(), standingBy.ID)
	rec.State, rec.Pid, rec.SnapshotCacheKey = api.StateStandingby, running.Pid, ""
	db.UpdateInstance(context.Background(), rec)
	id, _ := db.Begin(context.Background(), "standby", standingBy.ID, opPayload{Prev: api.StateRunning})
	db.Step(context.Background(), id, "created", nil)
	db.Close()

	m := newManagerAt(t, dir)
	ctx := context.Background()
	in, _ := m.GetInstance(ctx, "running")
	if in.State != api.StateStopped {
		t.Errorf("instance whose VMM died with no snapshot: %s, want Stopped", in.State)
	}
	in, _ = m.GetInstance(ctx, "standingby")
	if in.State != api.StateStandby || in.SnapshotCacheKey == "" {
		t.Errorf("standby interrupted after its snapshot: %+v, want Standby with a cache key", in)
	}
	if open, _ := m.db.OpenEntries(ctx); len(open) != 0 {
		t.Errorf("%d journal entries still open after reconcile", len(open))
	}
	action(t, m, "standingby", "restore")
	verifyGuest(t, m, in.ID)
	action(t, m, "running", "start")
}

// A daemon killed and started again on its data dir finds the cgroups of
// VMMs that died meanwhile (and of a VMM whose record is gone) and removes
// them; a running VMM keeps its own. Once the last VMM is gone, the daemon
// removes the data dir's parent cgroups as it closes: restarts leave
// nothing behind. (Each cgroup is checked to be there before the restart:
// nothing but the reconciler removes it.)
func TestReconcileRemovesTheCgroupsOfVMMsThatAreGone(t *testing.T) {
	dir := shortDir(t)
	var gone, alive api.Instance
	var dirsOf func(id string) []string
	var parents []string
	openAndClose(t, dir, func(m *Manager) {
		gone = createRunning(t, m, "gone")
		alive = createRunning(t, m, "alive")
		dirsOf = func(id string) []string {
			cg, err := m.jail.cgroup(id)
			if err != nil {
				t.Fatal(err)
			}
			return slices.Sorted(maps.Values(cg.Dirs))
		}
		parents = dirsOf("")
	})
	if err := syscall.Kill(gone.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitDead(t, gone.Pid)
	stray := newID() // a VMM cgroup no record claims
	for _, d := range dirsOf(stray) {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	exists := func(d string) bool { _, err := os.Stat(d); return err == nil }
	for _, d := range append(dirsOf(gone.ID), dirsOf(stray)...) {
		if !exists(d) {
			t.Fatalf("before the restart: %s is missing (nothing would be left to remove)", d)
		}
	}

	openAndClose(t, dir, func(m *Manager) {
		for _, d := range append(dirsOf(gone.ID), dirsOf(stray)...) {
			if exists(d) {
				t.Errorf("after the restart: %s, the cgroup of a VMM that is gone, is still there", d)
			}
		}
		for _, d := range dirsOf(alive.ID) {
			if !exists(d) {
				t.Errorf("after the restart: %s, the cgroup of the running VMM, is gone", d)
			}
		}
		for _, ref := range []string{"gone", "alive"} {
			if err := m.DeleteInstance(context.Background(), ref); err != nil {
				t.Fatal(err)
			}
		}
	})
	for _, d := range parents {
		if exists(d) {
			t.Errorf("the data dir's parent cgroup %s outlived its last VMM and the daemon", d)
		}
	}
}

func TestReconcileRemovesInterruptedForkAndTempFiles(t *testing.T) {
	dir := shortDir(t)
	var src api.Instance
	openAndClose(t, dir, func(m *Manager) {
		src = createRunning(t, m, "src")
		action(t, m, "src", "standby")
	})
	ctx := context.Background()
	db, err := store.Open(ctx, filepath.Join(dir, "forkd.db"))
	if err != nil {
		t.Fatal(err)
	}
	forkID := newID()
	jid, _ := db.Begin(ctx, "fork", forkID, opPayload{Source: "instance:" + src.ID})
	db.CreateInstance(ctx, store.Instance{ID: forkID, Name: "half", State: api.StateForking, Vcpus: 1, MemoryMiB: testMemMiB})
	db.Step(ctx, jid, "created", nil)
	db.Close()
	layout, _ := guestdir.New(dir)
	tmpFork, _ := layout.TempGuest(forkID)
	srcG, _ := layout.Guest(src.ID)
	leftovers := []string{
		tmpFork.Latest().Memory(),
		filepath.Join(srcG.Latest().Dir, "memory.unshare.tmp"),
		filepath.Join(dir, "snapshots", ".tmp-"+newID(), "memory"),
		filepath.Join(layout.JailsDir(), newID(), "root", "kernel"), // a dir no record claims
		// reflink probes a power cut brought back (where guest memory
		// lives, and the data dir before the first guest)
		filepath.Join(layout.JailsDir(), memfile.ReflinkProbePrefix+"1", "b"),
		filepath.Join(dir, memfile.ReflinkProbePrefix+"2", "a"),
		filepath.Join(dir, dirrecord.ProbePrefix+"3", "a"), // the directory-record probe's
	}
	for _, p := range leftovers {
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	m := newManagerAt(t, dir)
	if _, err := m.GetInstance(ctx, "half"); err == nil {
		t.Error("interrupted fork still has a record")
	}
	for _, p := range leftovers {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("leftover %s not removed", p)
		}
	}
	in, _ := m.GetInstance(ctx, "src")
	if in.State != api.StateStandby {
		t.Fatalf("source: %s, want Standby", in.State)
	}
	action(t, m, "src", "restore")
	verifyGuest(t, m, src.ID)
}

func waitDead(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for processAlive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d did not die", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// processAlive reports whether pid runs. A zombie does not: a VMM
// launched by an earlier manager in this test process stays one until that
// manager's reaper goroutine waits for it, which under load can come after
// the kill that made it one has returned.
func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command name, which is in parentheses and may
	// itself hold any character.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return true
	}
	return s[i+2] != 'Z' && s[i+2] != 'X'
}
