package instance

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/pager"
	"github.com/forkd/forkd/internal/store"
	"github.com/forkd/forkd/internal/testenv"
	"github.com/forkd/forkd/internal/uffd"
)

// Finding: a Uffd restore of a truncated mem-file failed after 10 s with
// "context deadline exceeded" (the cause only in the pager's log), and a
// fork of that instance (or of a snapshot sharing its inode) succeeded and
// inherited the damage. Now every restore and fork of it fails at once,
// saying the mem-file is shorter than the VM's RAM, and nothing is made.
func TestTruncatedMemFileIsRefusedAtOnceAndNeverForked(t *testing.T) {
	m := newTestManager(t)
	ctx := context.Background()
	src := createRunning(t, m, "src")
	action(t, m, "src", "standby")
	if _, err := m.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "snap"}); err != nil {
		t.Fatal(err)
	}
	// The snapshot links the same inode: truncating one truncates both.
	if err := os.Truncate(latestMem(t, m, src.ID), testMemMiB<<20/2); err != nil {
		t.Fatal(err)
	}
	refused := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, api.ErrInvalidState) || !strings.Contains(err.Error(), "shorter than its 32 MiB of RAM") {
			t.Errorf("%s of a truncated mem-file: %v; want ErrInvalidState saying it is shorter than the RAM", what, err)
		}
	}
	for _, b := range []string{api.BackendFile, api.BackendUffd} {
		_, err := m.Action(ctx, "src", "restore", api.ActionRequest{RestoreBackend: b})
		refused(b+" restore", err)
	}
	_, err := m.ForkInstance(ctx, "src", api.ForkRequest{Name: "kid"})
	refused("fork", err)
	_, err = m.ForkSnapshot(ctx, "snap", api.ForkRequest{Name: "kid2"})
	refused("fork of the snapshot", err)
	list, _ := m.ListInstances(ctx)
	if len(list) != 1 {
		t.Errorf("%d instances after the refused forks, want only the source", len(list))
	}
	in, _ := m.GetInstance(ctx, "src")
	if in.State != api.StateStandby || in.Error != "" {
		t.Errorf("source after the refusals: %s error %q; want Standby with no stored error", in.State, in.Error)
	}
}

// Finding: a failed restore left its error stored on the Standby instance,
// where the API promises "" unless Error. Now the caller gets the error, the
// record keeps none; the same for a standby that leaves the VM Running, and
// for a restore the reconciler rolls back.
func TestErrorIsStoredOnlyInStoppedAndError(t *testing.T) {
	m := newTestManager(t)
	ctx := context.Background()
	createRunning(t, m, "vm")
	in := action(t, m, "vm", "standby")
	g, _ := m.layout.Guest(in.ID)
	// A vmstate the VMM refuses: the restore fails after the VMM started.
	if err := os.WriteFile(g.Latest().VMState(), []byte("not a vmstate"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Action(ctx, "vm", "restore", api.ActionRequest{}); err == nil {
		t.Fatal("restore of a garbage vmstate succeeded")
	}
	got, _ := m.GetInstance(ctx, "vm")
	rec, _ := m.db.GetInstance(ctx, in.ID)
	if got.State != api.StateStandby || got.Error != "" || rec.Error != "" {
		t.Errorf("after a failed restore: %s, API error %q, stored %q; want Standby with none", got.State, got.Error, rec.Error)
	}
	// A standby that fails (its snapshots dir cannot be made) leaves the VM
	// Running, and the record without the error.
	vm2 := createRunning(t, m, "vm2")
	g2, _ := m.layout.Guest(vm2.ID)
	if err := os.WriteFile(g2.SnapshotsDir(), []byte("in the way"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Action(ctx, "vm2", "standby", api.ActionRequest{}); err == nil {
		t.Fatal("standby with its snapshots dir blocked succeeded")
	}
	if got, _ := m.GetInstance(ctx, "vm2"); got.State != api.StateRunning || got.Error != "" {
		t.Errorf("after a failed standby: %s, error %q; want Running with none", got.State, got.Error)
	}
	os.Remove(g2.SnapshotsDir())
	action(t, m, "vm2", "standby")
	// A record from before the rule still reads "" outside Stopped/Error.
	rec.Error = "old failure"
	m.db.UpdateInstance(ctx, rec)
	if got, _ := m.GetInstance(ctx, "vm"); got.Error != "" {
		t.Errorf("a Standby record's stale error is shown: %q", got.Error)
	}
	// The twin: in Stopped the reason is shown.
	rec.State = api.StateStopped
	m.db.UpdateInstance(ctx, rec)
	if got, _ := m.GetInstance(ctx, "vm"); got.Error != "old failure" {
		t.Errorf("a Stopped instance's error is hidden: %q", got.Error)
	}
}

// The reconciler's roll-back of a restore a crash interrupted leaves the
// instance Standby with no stored error (the journal outcome says what
// happened).
func TestInterruptedRestoreRollsBackWithoutAStoredError(t *testing.T) {
	dir := shortDir(t)
	var in api.Instance
	openAndClose(t, dir, func(m *Manager) {
		createRunning(t, m, "vm")
		in = action(t, m, "vm", "standby")
	})
	ctx := context.Background()
	db, err := store.Open(ctx, filepath.Join(dir, "forkd.db"))
	if err != nil {
		t.Fatal(err)
	}
	rec, _ := db.GetInstance(ctx, in.ID)
	rec.State = api.StateRestoring
	db.UpdateInstance(ctx, rec)
	db.Begin(ctx, "restore", in.ID, opPayload{Prev: api.StateStandby})
	db.Close()
	m := newManagerAt(t, dir)
	rec, _ = m.db.GetInstance(ctx, in.ID)
	if rec.State != api.StateStandby || rec.Error != "" {
		t.Errorf("after reconcile: %s, stored error %q; want Standby with none", rec.State, rec.Error)
	}
	entries, _ := m.db.Entries(ctx, 5)
	if len(entries) == 0 || !strings.Contains(entries[0].Outcome, "interrupted") {
		t.Errorf("the journal does not say the restore was interrupted: %+v", entries)
	}
}

// Finding: a snapshot whose directory vanished was still listed ready, and
// forks of it failed obscurely. Now the reconciler (or the fork that finds
// it) marks it broken; a fork says why and how to clear it, and delete
// still works.
func TestSnapshotWhoseDirIsGoneIsBroken(t *testing.T) {
	dir := shortDir(t)
	var snapID string
	openAndClose(t, dir, func(m *Manager) {
		createRunning(t, m, "src")
		action(t, m, "src", "standby")
		for _, n := range []string{"gone", "vanishes", "fine"} {
			sn, err := m.CreateSnapshot(context.Background(), "src", api.SnapshotRequest{Name: n})
			if err != nil {
				t.Fatal(err)
			}
			if n == "gone" {
				snapID = sn.ID
			}
		}
	})
	if err := os.RemoveAll(filepath.Join(dir, "snapshots", snapID)); err != nil {
		t.Fatal(err)
	}
	m := newManagerAt(t, dir)
	ctx := context.Background()
	sn, _ := m.GetSnapshot(ctx, "gone")
	if sn.State != snapBroken {
		t.Errorf("snapshot whose dir is gone: state %q, want broken", sn.State)
	}
	// The twin: an intact one stays ready.
	if sn, _ := m.GetSnapshot(ctx, "fine"); sn.State != snapReady {
		t.Errorf("intact snapshot: state %q, want ready", sn.State)
	}
	// One that vanishes while the daemon runs is found by the fork.
	v, _ := m.GetSnapshot(ctx, "vanishes")
	os.RemoveAll(filepath.Join(dir, "snapshots", v.ID, "vmstate"))
	for _, ref := range []string{"gone", "vanishes"} {
		_, err := m.ForkSnapshot(ctx, ref, api.ForkRequest{Name: "kid-" + ref})
		if !errors.Is(err, api.ErrInvalidState) || !strings.Contains(err.Error(), "broken") || !strings.Contains(err.Error(), "delete it") {
			t.Errorf("fork of the %s snapshot: %v; want ErrInvalidState saying it is broken and to delete it", ref, err)
		}
	}
	if sn, _ := m.GetSnapshot(ctx, "vanishes"); sn.State != snapBroken {
		t.Errorf("snapshot that lost its vmstate: state %q, want broken", sn.State)
	}
	if _, err := m.ForkSnapshot(ctx, "fine", api.ForkRequest{Name: "kid"}); err != nil {
		t.Errorf("fork of the intact snapshot: %v", err)
	}
	for _, ref := range []string{"gone", "vanishes"} {
		if err := m.DeleteSnapshot(ctx, ref); err != nil {
			t.Errorf("delete of the broken snapshot %s: %v", ref, err)
		}
	}
}

// Finding: the pager's refusal of a handshake reached only its log; the
// restore timed out. Now the manager waits for the pager to serve the
// session and, when the pager ended it, says why. The twin is a good
// handshake, which WaitServing accepts.
func TestPagerHandshakeErrorsReachTheCaller(t *testing.T) {
	fd, err := uffd.Open(unix.O_CLOEXEC | unix.O_NONBLOCK)
	why := ""
	if err != nil {
		why = "userfaultfd: " + err.Error()
	}
	testenv.Need(t, testenv.Uffd, why)
	defer fd.Close()
	if err := fd.API(0); err != nil {
		t.Fatal(err)
	}
	m := newTestManager(t)
	ctx := context.Background()
	pg, err := m.pager(ctx)
	if err != nil {
		t.Fatal(err)
	}
	backing := filepath.Join(m.layout.Root(), "test-memory") // the pager serves only files in the data dir
	if err := os.WriteFile(backing, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	addr := uint64(uintptrOf(mem))
	if _, err := fd.Register(addr, 1<<20, uffd.RegisterModeMissing); err != nil {
		t.Fatal(err)
	}
	handshake := func(id string, size uint64) error {
		sock, err := pg.CreateSession(ctx, pager.SessionRequest{SessionID: id, BackingPath: backing, CacheKey: "k-" + id})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pg.DeleteSession(context.Background(), id) })
		conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		r := []uffd.Region{{BaseHostVirtAddr: addr, Size: size, PageSize: uffd.PageSize, PageSizeKiB: uffd.PageSize}}
		if err := uffd.SendHandshake(conn, r, fd.Fd()); err != nil {
			t.Fatal(err)
		}
		return pg.WaitServing(ctx, id)
	}
	id := newID()[:8]
	// 2 MiB of regions over a 1 MiB mem-file: the pager refuses them.
	err = handshake("bad-"+id, 2<<20)
	if err == nil || !strings.Contains(err.Error(), "ends past the end of") {
		t.Errorf("WaitServing after a refused handshake: %v; want the pager's reason", err)
	}
	if err := handshake("good-"+id, 1<<20); err != nil {
		t.Errorf("WaitServing after a good handshake: %v", err)
	}
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }
