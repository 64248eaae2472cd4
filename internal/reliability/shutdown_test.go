package reliability

import (
	"context"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// TestShutdownWithAHungOperationEndsAndLosesNothing: a standby stalls on a
// VMM that cannot answer (stopped with SIGSTOP: the operation is stuck, as
// one hung on a FIFO would be). SIGTERM must still end the daemon: both
// listeners stop at once, and after shutdown_grace it exits instead of
// waiting forever or closing the store under the operation. The next
// daemon starts (the data dir is free), its reconciler rolls the
// interrupted standby back from the journal, as after a crash, and
// everything is operable with its memory intact.
func TestShutdownWithAHungOperationEndsAndLosesNothing(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil, "--shutdown-grace", "1s")
	in := createRunning(t, d.Client, "stuck")
	createStandby(t, d.Client, "bystander")
	if err := syscall.Kill(in.Pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(in.Pid, syscall.SIGCONT) })
	standby := make(chan error, 1)
	go func() {
		_, err := d.Client.Action(context.Background(), "stuck", "standby", api.ActionRequest{})
		standby <- err
	}()
	waitState(t, d.Client, "stuck", api.StateStandingby) // the standby is in flight
	addFigure("faults_injected", 1)

	if err := syscall.Kill(d.Pid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	ws, err := d.WaitExit(60 * time.Second)
	if err != nil {
		t.Fatalf("the daemon did not exit with an operation hung: %v", err)
	}
	if ws.Exited() && ws.ExitStatus() == 0 {
		t.Errorf("the daemon exited 0 with an operation still running; want a failure status")
	}
	if err := <-standby; err == nil {
		t.Error("the hung standby was answered as a success")
	}
	if _, err := net.Dial("unix", d.Layout.Socket()); err == nil {
		t.Error("the socket of the exited daemon still accepts connections")
	}
	syscall.Kill(in.Pid, syscall.SIGCONT)

	d = restart(t, d, nil)
	got := waitState(t, d.Client, "stuck", api.StateRunning)
	if got.Pid != in.Pid {
		t.Errorf("after the restart the VM runs VMM pid %d, want its own %d (adopted)", got.Pid, in.Pid)
	}
	checkAll(t, d)
	if _, err := Exercise(ctxT(t, 90*time.Second), d.Client); err != nil {
		t.Errorf("after a shutdown that left a standby to the journal: %v", err)
	}
}
