package firecracker

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A VMM this process launched reports its exit as an event with its wait
// status: a VMM killed by SIGKILL (what the OOM killer does) says so.
func TestExitOfALaunchedVMMCarriesItsWaitStatus(t *testing.T) {
	p := launchForTest(t, context.Background(), helperSpec(t, "serve"))
	select {
	case <-p.Done():
		t.Fatal("Done closed while the VMM runs")
	default:
	}
	if err := syscall.Kill(p.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, p.Done(), "the launched VMM's exit")
	e := p.Exit()
	if !e.Known || !e.Status.Signaled() || e.Status.Signal() != syscall.SIGKILL {
		t.Fatalf("Exit() = %+v (%s), want killed by SIGKILL", e, e)
	}
}

// The causes later layers tell apart read plainly (the jail maps SIGSYS to
// a seccomp violation).
func TestExitSaysHowTheProcessEnded(t *testing.T) {
	for _, tc := range []struct {
		exit Exit
		want string
	}{
		{Exit{Known: true, Status: syscall.WaitStatus(syscall.SIGSYS)}, "killed by signal 31 (SIGSYS)"},
		{Exit{Known: true, Status: syscall.WaitStatus(3 << 8)}, "exited with status 3"},
		{Exit{}, "status unknown"},
	} {
		if got := tc.exit.String(); !strings.Contains(got, tc.want) {
			t.Errorf("%+v: %q, want it to contain %q", tc.exit, got, tc.want)
		}
	}
}

// A VMM adopted after its launcher exited (a daemon restart) is watched
// through a pidfd: its exit is an event too, with the status unknown.
func TestExitOfAnAdoptedVMMIsAnEvent(t *testing.T) {
	p := adoptOrphan(t)
	done := p.Done()
	select {
	case <-done:
		t.Fatal("Done closed while the adopted VMM runs")
	default:
	}
	if err := syscall.Kill(p.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, done, "the adopted VMM's exit")
	if e := p.Exit(); e.Known {
		t.Errorf("Exit() of an adopted VMM = %+v, want unknown (not our child)", e)
	}
}

// Release stops the watch of an adopted VMM: its goroutine ends and Done
// stays open.
func TestReleaseEndsTheWatchOfAnAdoptedVMM(t *testing.T) {
	p := adoptOrphan(t)
	before := runtime.NumGoroutine()
	done := p.Done()
	p.Release()
	deadline := time.Now().Add(30 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines after Release, %d before the watch", runtime.NumGoroutine(), before)
		}
		time.Sleep(5 * time.Millisecond)
	}
	select {
	case <-done:
		t.Fatal("Done closed by Release; the VMM still runs")
	default:
	}
	if !p.Alive() {
		t.Fatal("the VMM died on Release; Release must only stop watching")
	}
}

// adoptOrphan launches a VMM from a stand-in daemon that exits at once and
// adopts the orphan, which is killed at cleanup.
func adoptOrphan(t *testing.T) *Process {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(shortTempDir(t), "api.sock")
	cmd := exec.Command(exe, sock)
	cmd.Env = append(os.Environ(), helperEnv+"=launcher")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("launcher: %v; stderr: %s", err, exitStderr(err))
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("launcher printed %q, want a pid", out)
	}
	t.Cleanup(func() { unix.Kill(pid, unix.SIGKILL) })
	p, err := Adopt(pid, sock)
	if err != nil {
		t.Fatalf("Adopt %d: %v", pid, err)
	}
	t.Cleanup(p.Release)
	return p
}

func waitClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(30 * time.Second):
		t.Fatalf("no event for %s in 30 s", what)
	}
}
