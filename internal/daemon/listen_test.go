package daemon

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// holdLock takes the data dir's lock through a separate open file
// description, recording owner as the pid, as a daemon (or its child caught
// between fork and exec) would.
func holdLock(t *testing.T, dir string, owner int) *os.File {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, "forkd.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Fatal(err)
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(owner)), 0)
	return f
}

// deadPid returns the pid of a process that has exited and been reaped.
func deadPid(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid
}

func TestLockOfADeadOwnerIsTakenOnceItsLastHolderLetsGo(t *testing.T) {
	dir := t.TempDir()
	held := holdLock(t, dir, deadPid(t))
	go func() {
		time.Sleep(200 * time.Millisecond)
		held.Close() // the straggler execs or exits
	}()
	f, err := lockDataDir(dir)
	if err != nil {
		t.Fatalf("lock after the dead owner's straggler let go: %v", err)
	}
	defer f.Close()
	got, _ := os.ReadFile(filepath.Join(dir, "forkd.lock"))
	if string(got) != strconv.Itoa(os.Getpid()) {
		t.Fatalf("lock file names pid %q, want ours (%d)", got, os.Getpid())
	}
}

func TestLockOfALiveOwnerFailsAtOnce(t *testing.T) {
	dir := t.TempDir()
	held := holdLock(t, dir, os.Getpid()) // alive: this test process
	defer held.Close()
	start := time.Now()
	_, err := lockDataDir(dir)
	if err == nil || !strings.Contains(err.Error(), "already running") {
		t.Fatalf("lock held by a live daemon: err = %v, want \"already running\"", err)
	}
	// Not a timing assertion on speed: a live owner must not be waited out
	// like a dead one (which retries for 2 s).
	if waited := time.Since(start); waited >= 2*time.Second {
		t.Fatalf("waited %v for a live owner's lock; it must fail without the dead-owner retry", waited)
	}
}
