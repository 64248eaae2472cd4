package instance

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// TestPagerCheckNeverCondemnsAVMOnAGuess: the supervisor of a Uffd-restored
// VM asks the pager in the background whether its session lives. A pager
// too slow to answer within the check's timeout (stopped here with SIGSTOP,
// as a loaded host might stall it) says nothing about the pager being dead:
// the VM must stay Running, not be recorded as Error. Reads meanwhile do
// not ask the pager anything.
func TestPagerCheckNeverCondemnsAVMOnAGuess(t *testing.T) {
	needUffd(t)
	m := newTestManager(t, func(c *Config) { c.SuperviseInterval = 20 * time.Millisecond })
	ctx := context.Background()
	createRunning(t, m, "vm")
	action(t, m, "vm", "standby")
	in, err := m.Action(ctx, "vm", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd})
	if err != nil {
		t.Fatal(err)
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
	stoppedAt := time.Now()
	// Two session checks that began after the stop have timed out.
	for i := 0; i < 2; i++ {
		waitUntil(t, "a session check of the stalled pager", func() bool {
			return m.factsOf(in.ID).sessionAsked.After(stoppedAt)
		})
		stoppedAt = m.factsOf(in.ID).sessionAsked
	}
	got, err := m.GetInstance(ctx, "vm")
	syscall.Kill(pid, syscall.SIGCONT)
	stopped = false
	if err != nil || got.State != api.StateRunning {
		t.Fatalf("after session checks of a stalled pager: %+v %v; want Running (a slow pager is not a dead one)", got, err)
	}
	verifyGuest(t, m, in.ID)
	if got, err := m.GetInstance(ctx, "vm"); err != nil || got.State != api.StateRunning {
		t.Fatalf("after the pager resumed: %+v %v; want Running", got, err)
	}
}
