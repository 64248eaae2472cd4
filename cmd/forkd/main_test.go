package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// buildForkd builds the real binary: the demo starts `forkd serve` and the
// daemon starts `forkd vmm`, so they must be this program, not the test binary.
func buildForkd(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "forkd")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func TestBinaryHelpAndDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and runs the demo; skipped with -short")
	}
	bin := buildForkd(t)

	out, err := exec.Command(bin, "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("forkd --help: %v\n%s", err, out)
	}
	for _, c := range []string{"serve", "run", "ps", "inspect", "pause", "resume", "standby", "restore", "stop",
		"start", "rm", "fork", "snapshot", "pager", "bench", "demo", "vmm", "completion"} {
		if !strings.Contains(string(out), "\n  "+c+" ") {
			t.Errorf("forkd --help does not list %q", c)
		}
	}

	// The demo cleans up after itself: no temp dir and no process of it
	// may remain, whether it passes or fails.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	tmp := t.TempDir()
	cmd := exec.CommandContext(ctx, bin, "demo", "--memory", "64", "--forks", "3")
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	out, err = cmd.CombinedOutput()
	t.Logf("forkd demo:\n%s", out)
	if err != nil {
		t.Errorf("forkd demo failed: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(tmp, "forkd-demo-*")); len(left) > 0 {
		t.Errorf("the demo left %v behind", left)
	}
	if ps, _ := exec.Command("pgrep", "-f", tmp).Output(); len(strings.TrimSpace(string(ps))) > 0 {
		t.Errorf("the demo left processes behind: pids %s", ps)
	}
}
