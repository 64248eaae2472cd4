package memfile

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/forkd/forkd/internal/testfs"
	"golang.org/x/sys/unix"
)

// Crash tests re-exec this test binary as a child that runs one operation and
// SIGKILLs itself right after a named step; the parent then checks what a
// crash there leaves on disk and that the next call recovers.
const (
	childOpEnv   = "FORKD_MEMFILE_CRASH_OP"
	childAEnv    = "FORKD_MEMFILE_CRASH_A"
	childBEnv    = "FORKD_MEMFILE_CRASH_B"
	childStepEnv = "FORKD_MEMFILE_CRASH_STEP"
)

// runChild is the child's whole life: run op, dying at the step.
func runChild(op string) int {
	a, b, killAt := os.Getenv(childAEnv), os.Getenv(childBEnv), os.Getenv(childStepEnv)
	o := Options{step: func(name string) {
		if name == killAt {
			fmt.Printf("killed at %s\n", name)
			unix.Kill(os.Getpid(), unix.SIGKILL)
			select {}
		}
	}}
	var err error
	switch op {
	case "clone":
		_, err = o.Clone(a, b)
	case "unshare":
		_, err = o.EnsureExclusive(a)
	case "naive-unshare":
		err = naiveUnshare(o, a)
	default:
		err = fmt.Errorf("unknown op %q", op)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	fmt.Println("finished without reaching", killAt)
	return 0
}

// naiveUnshare is the unsafe way to unshare (unlink, then copy into the
// name): the crash check must catch a kill in the middle of it.
func naiveUnshare(o Options, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := os.Remove(path); err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.Write(data[:len(data)/2]); err != nil {
		return err
	}
	o.at(stepExtentCopied)
	_, err = f.Write(data[len(data)/2:])
	return err
}

// crashAt runs op in a child killed after step and fails t unless it died
// of SIGKILL there.
func crashAt(t *testing.T, op, step, a, b string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childOpEnv+"="+op, childAEnv+"="+a, childBEnv+"="+b, childStepEnv+"="+step)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) {
		t.Fatalf("child %s: want death by SIGKILL at %s, got err %v: %s", op, step, err, out.String())
	}
	ws, ok := exit.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL || !strings.Contains(out.String(), "killed at "+step) {
		t.Fatalf("child %s: want death by SIGKILL at %s, got %v: %s", op, step, err, out.String())
	}
}

// killSteps are the steps of a clone-to-temp-then-rename, in order.
func killSteps(kind testfs.Kind) []string {
	steps := []string{stepTempCreated}
	if !kind.Reflink() {
		steps = append(steps, stepExtentCopied) // a sparse copy half done
	}
	return append(steps, stepTempWritten, stepTempSynced, stepRenamed)
}

func TestEnsureExclusiveKilledAtAnyStepLeavesOldOrNewAndRecovers(t *testing.T) {
	onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
		for _, step := range killSteps(kind) {
			t.Run(step, func(t *testing.T) {
				d := filepath.Join(dir, step)
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
				src, fork := filepath.Join(d, "memory"), filepath.Join(d, "fork-memory")
				size, exts := testLayout(t)
				writeSparse(t, src, size, exts...)
				if _, err := ShareForFork(src, fork); err != nil {
					t.Fatal(err)
				}
				srcIno, want := stat(t, src).Ino, sum(t, src)

				crashAt(t, "unshare", step, fork, "")

				// Old or new: the fork's name holds the full bytes either way.
				if got := sum(t, fork); got != want {
					t.Fatalf("after kill at %s: fork bytes are neither old nor new (sha %s, want %s)", step, got, want)
				}
				if st := stat(t, src); st.Ino != srcIno || sum(t, src) != want {
					t.Fatalf("after kill at %s: source inode or bytes changed", step)
				}
				renamed := step == stepRenamed
				if shared := stat(t, fork).Ino == srcIno; shared == renamed {
					t.Fatalf("after kill at %s: fork shares the source inode = %v", step, shared)
				}
				unshared, err := EnsureExclusive(fork)
				if err != nil {
					t.Fatal(err)
				}
				if unshared == renamed {
					t.Fatalf("recovery EnsureExclusive after kill at %s = %v, want %v", step, unshared, !renamed)
				}
				if exists(fork+unshareSuffix) || sum(t, fork) != want || stat(t, fork).Nlink != 1 || stat(t, src).Nlink != 1 {
					t.Fatalf("after recovery from kill at %s: temp left, bytes wrong or still shared", step)
				}
			})
		}
	})
}

func TestCloneKilledAtAnyStepLeavesNothingOrAWholeCopy(t *testing.T) {
	onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
		for _, step := range killSteps(kind) {
			t.Run(step, func(t *testing.T) {
				src, dst := filepath.Join(dir, step+"-memory"), filepath.Join(dir, step+"-clone")
				size, exts := testLayout(t)
				writeSparse(t, src, size, exts...)
				want := sum(t, src)

				crashAt(t, "clone", step, src, dst)

				if step == stepRenamed {
					if sum(t, dst) != want {
						t.Fatalf("after kill at %s: clone incomplete", step)
					}
					return
				}
				if exists(dst) {
					t.Fatalf("after kill at %s: %s exists before its rename", step, dst)
				}
				if _, err := Clone(src, dst); err != nil {
					t.Fatalf("Clone after a kill at %s: %v", step, err)
				}
				if sum(t, dst) != want || exists(dst+".tmp") {
					t.Fatalf("Clone after a kill at %s: wrong bytes or temp left", step)
				}
			})
		}
	})
}

// Twin of the crash tests: an unshare that unlinks and rewrites the name in
// place, killed midway, must be caught by the same old-or-new check.
func TestCrashCheckCatchesANonAtomicUnshare(t *testing.T) {
	dir := t.TempDir()
	src, fork := filepath.Join(dir, "memory"), filepath.Join(dir, "fork-memory")
	size, exts := testLayout(t)
	writeSparse(t, src, size, exts...)
	if err := os.Link(src, fork); err != nil {
		t.Fatal(err)
	}
	want := sum(t, src)
	crashAt(t, "naive-unshare", stepExtentCopied, fork, "")
	if sum(t, fork) == want {
		t.Fatal("a non-atomic unshare killed midway left the full bytes: the crash check cannot fail")
	}
}
