package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/testenv"
)

// buildForkd is the real binary, built once per test process: the demo
// starts `forkd serve` and the daemon starts `forkd vmm`, so they must be
// this program, not the test binary. A build failure fails the test.
func buildForkd(t *testing.T) string {
	t.Helper()
	return testenv.ForkdBinary(t)
}

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.RemoveBuild()
	os.Exit(code)
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
