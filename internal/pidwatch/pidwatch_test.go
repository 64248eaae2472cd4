package pidwatch

import (
	"os/exec"
	"runtime"
	"testing"
	"time"
)

// A watched process's exit closes Done; before it, Done stays open.
func TestExitIsAnEvent(t *testing.T) {
	cmd := exec.Command("sleep", "3600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	w, err := New(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Release()
	if w.Exited() {
		t.Fatal("Done closed while the process runs")
	}
	cmd.Process.Kill()
	select {
	case <-w.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("no exit event 30 s after the kill")
	}
}

// A pid that is already gone is an exit at once, not an error.
func TestGoneProcessIsAlreadyDone(t *testing.T) {
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	w, err := New(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if !w.Exited() {
		t.Fatal("a reaped process's watch is not done")
	}
}

// Release ends the watching goroutine and leaves Done open.
func TestReleaseEndsTheWatch(t *testing.T) {
	cmd := exec.Command("sleep", "3600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	before := runtime.NumGoroutine()
	w, err := New(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	w.Release()
	w.Release()
	for deadline := time.Now().Add(30 * time.Second); runtime.NumGoroutine() > before; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines after Release, %d before", runtime.NumGoroutine(), before)
		}
	}
	if w.Exited() {
		t.Fatal("Release closed Done although the process runs")
	}
}
