package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
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

	// The demo cleans up after itself: neither its temp dir nor any process
	// naming it may remain, whether it passes or fails. (It runs in the
	// default temp dir: socket paths under it must fit the kernel's 108 bytes.)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err = exec.CommandContext(ctx, bin, "demo", "--memory", "64", "--forks", "4").CombinedOutput()
	t.Logf("forkd demo:\n%s", out)
	if err != nil {
		t.Errorf("forkd demo failed: %v", err)
	}
	m := regexp.MustCompile(`on data dir (\S+)/data`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("the demo did not say where its data dir was")
	}
	tmp := string(m[1])
	if _, err := os.Stat(tmp); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the demo left %s behind (stat: %v)", tmp, err)
	}
	if ps, _ := exec.Command("pgrep", "-f", tmp).Output(); len(strings.TrimSpace(string(ps))) > 0 {
		t.Errorf("the demo left processes behind: pids %s", ps)
	}
}
