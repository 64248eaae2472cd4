package instance

import (
	"context"
	"syscall"
	"testing"

	"github.com/forkd/forkd/internal/api"
)

// TestPagerCheckNeverCondemnsAVMOnAGuess: a read of a Uffd-restored VM asks
// the pager whether its session lives. A client that cancels its request,
// or a pager too slow to answer within the check's timeout (stopped here
// with SIGSTOP, as a loaded host might stall it), says nothing about the
// pager being dead: the VM must stay Running, not be recorded as Error.
func TestPagerCheckNeverCondemnsAVMOnAGuess(t *testing.T) {
	needUffd(t)
	m := newTestManager(t)
	ctx := context.Background()
	createRunning(t, m, "vm")
	action(t, m, "vm", "standby")
	in, err := m.Action(ctx, "vm", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd})
	if err != nil {
		t.Fatal(err)
	}

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	m.GetInstance(cancelled, "vm") // whatever it answers, it must record nothing
	if got, err := m.GetInstance(ctx, "vm"); err != nil || got.State != api.StateRunning {
		t.Fatalf("after a cancelled read: %+v %v; want Running", got, err)
	}

	pid := pagerPid(t, m)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	defer func() {
		if stopped {
			syscall.Kill(pid, syscall.SIGCONT)
		}
	}()
	got, err := m.GetInstance(ctx, "vm")
	syscall.Kill(pid, syscall.SIGCONT)
	stopped = false
	if err != nil || got.State != api.StateRunning {
		t.Fatalf("read while the pager was stalled: %+v %v; want Running (a slow pager is not a dead one)", got, err)
	}
	if got, err := m.GetInstance(ctx, "vm"); err != nil || got.State != api.StateRunning {
		t.Fatalf("after the pager resumed: %+v %v; want Running", got, err)
	}
	verifyGuest(t, m, in.ID)
}
