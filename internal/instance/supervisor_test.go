package instance

import (
	"context"
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/store"
)

// Reads only read: with a VMM stopped by SIGSTOP (it will not answer
// anything), GET and list answer from the record and the supervisor's last
// facts. A read that asked the VMM would wait out its timeout and report
// memory_check "unknown"; these report the last check, "ok".
func TestReadsDoNoIOToTheVMM(t *testing.T) {
	m := newTestManager(t, func(c *Config) { c.SuperviseInterval = time.Hour })
	ctx := context.Background()
	in := createRunning(t, m, "vm")
	if err := syscall.Kill(in.Pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer syscall.Kill(in.Pid, syscall.SIGCONT)
	got, err := m.GetInstance(ctx, "vm")
	if err != nil || got.State != api.StateRunning || got.MemoryCheck != "ok" {
		t.Fatalf("GET of a Running VM whose VMM is stopped: %+v %v; want Running, memory_check ok (no I/O to the VMM)", got, err)
	}
	list, err := m.ListInstances(ctx)
	if err != nil || len(list) != 1 || list[0].MemoryCheck != "ok" {
		t.Fatalf("list with a stopped VMM: %+v %v; want the one VM, memory_check ok", list, err)
	}
	syscall.Kill(in.Pid, syscall.SIGCONT)
	verifyGuest(t, m, in.ID)
}

// The supervisor refreshes the memory check in the background: a reading
// taken after the VM came up shows in GET without GET asking for it.
func TestSupervisorRefreshesTheMemoryCheck(t *testing.T) {
	m := newTestManager(t, func(c *Config) { c.SuperviseInterval = 20 * time.Millisecond })
	in := createRunning(t, m, "vm")
	started := time.Now()
	waitUntil(t, "a background memory check", func() bool {
		return m.factsOf(in.ID).checkedAt.After(started)
	})
	if f := m.factsOf(in.ID); f.memoryCheck != "ok" {
		t.Fatalf("background memory check %q, want ok", f.memoryCheck)
	}
	action(t, m, "vm", "standby")
	if s := m.supervisorOf(in.ID); s != nil {
		t.Fatal("a Standby instance still has a supervisor")
	}
}

// Lock maps shrink with the instances: after every instance and snapshot
// is deleted, nothing of them is left in the manager's maps.
func TestDeletedInstancesLeaveNothingInTheMaps(t *testing.T) {
	m := newTestManager(t)
	ctx := context.Background()
	createRunning(t, m, "src")
	action(t, m, "src", "standby")
	fork(t, m, "src", api.ForkRequest{Name: "kid", TargetState: api.StateRunning})
	if _, err := m.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "snap"}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.ForkInstance(ctx, "src", api.ForkRequest{Name: "src"}); err == nil {
		t.Fatal("a fork named like an existing instance succeeded")
	}
	for _, ref := range []string{"kid", "src"} {
		if err := m.DeleteInstance(ctx, ref); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.DeleteSnapshot(ctx, "snap"); err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if n := len(m.instLocks) + len(m.snapLocks) + len(m.procs) + len(m.sups); n != 0 {
		t.Fatalf("after deleting everything: %d instance locks, %d snapshot locks, %d VMMs, %d supervisors; want none",
			len(m.instLocks), len(m.snapLocks), len(m.procs), len(m.sups))
	}
}

// An instance deleted between being resolved and being locked leaves no
// lock behind: its delete dropped the lock it knew, and the late locker's
// new one is dropped when it finds the record gone.
func TestALateLockOfADeletedInstanceLeavesNoLock(t *testing.T) {
	m := newTestManager(t)
	ctx := context.Background()
	createRunning(t, m, "vm")
	in, err := m.resolveInstance(ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	if err := m.DeleteInstance(ctx, "vm"); err != nil {
		t.Fatal(err)
	}
	for _, write := range []bool{false, true} {
		if _, _, err := m.lockResolved(ctx, in, write); !errors.Is(err, api.ErrNotFound) {
			t.Fatalf("lock of a deleted instance (write %v): err %v, want not found", write, err)
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.instLocks[in.ID]; ok || len(m.instLocks) != 0 {
		t.Fatalf("%d instance locks left (one for the deleted %s: %v), want none", len(m.instLocks), in.ID, ok)
	}
}

// The same for a snapshot: a fork, compression or delete that resolved it
// before its delete finished leaves no lock for it.
func TestALateLockOfADeletedSnapshotLeavesNoLock(t *testing.T) {
	m := newTestManager(t)
	ctx := context.Background()
	createRunning(t, m, "vm")
	action(t, m, "vm", "standby")
	if _, err := m.CreateSnapshot(ctx, "vm", api.SnapshotRequest{Name: "snap"}); err != nil {
		t.Fatal(err)
	}
	sn, err := m.resolveSnapshot(ctx, "snap")
	if err != nil {
		t.Fatal(err)
	}
	if err := m.DeleteSnapshot(ctx, "snap"); err != nil {
		t.Fatal(err)
	}
	for _, write := range []bool{false, true} {
		if _, _, err := m.lockSnapshot(ctx, sn.ID, write); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("lock of a deleted snapshot (write %v): err %v, want not found", write, err)
		}
	}
	if _, err := m.ForkSnapshot(ctx, sn.ID, api.ForkRequest{Name: "late"}); !errors.Is(err, api.ErrNotFound) {
		t.Fatalf("fork of a deleted snapshot: err %v, want not found", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.snapLocks[sn.ID]; ok || len(m.snapLocks) != 0 {
		t.Fatalf("%d snapshot locks left (one for the deleted %s: %v), want none", len(m.snapLocks), sn.ID, ok)
	}
}
