package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
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
	os.Exit(testenv.Main(m))
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
	const forks = 4
	cmd := exec.CommandContext(ctx, bin, "demo", "--memory", "64", "--forks", strconv.Itoa(forks), "-o", "json")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	t.Logf("forkd demo:\n%s", stderr.String())
	if err != nil {
		t.Errorf("forkd demo failed: %v", err)
	}
	var rep struct {
		DataDir string `json:"data_dir"`
		Steps   []struct {
			Name   string `json:"name"`
			OK     bool   `json:"ok"`
			Detail string `json:"detail"`
		} `json:"steps"`
		MemoryChecks    map[string]string `json:"memory_checks"`
		ForkModes       map[string]int    `json:"fork_modes"`
		RestoreBackends map[string]int    `json:"restore_backends"`
		PagerHits       int64             `json:"pager_hits"`
		Passed          bool              `json:"passed"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil {
		t.Fatalf("forkd demo -o json printed no report: %v\n%s", err, stdout.String())
	}
	// Every step ran, in order, and passed.
	var names []string
	for _, s := range rep.Steps {
		names = append(names, s.Name)
		if !s.OK {
			t.Errorf("demo step %s failed: %s", s.Name, s.Detail)
		}
	}
	if want := demoSteps(); !slices.Equal(names, want) {
		t.Errorf("demo steps %v, want %v", names, want)
	}
	if !rep.Passed {
		t.Errorf("demo report says it did not pass")
	}
	// Every VM's memory check: the source and each fork, all ok.
	if len(rep.MemoryChecks) != forks+1 {
		t.Errorf("memory checks of %d VMs (%v), want the source and %d forks", len(rep.MemoryChecks), rep.MemoryChecks, forks)
	}
	for name, check := range rep.MemoryChecks {
		if check != "ok" {
			t.Errorf("memory check of %s: %q, want ok", name, check)
		}
	}
	if rep.ForkModes["hardlink"] != forks {
		t.Errorf("fork modes %v, want %d hardlinks", rep.ForkModes, forks)
	}
	if rep.RestoreBackends["file"] != forks/2 || rep.RestoreBackends["uffd"] != forks/2 {
		t.Errorf("restore backends %v, want %d file and %d uffd", rep.RestoreBackends, forks/2, forks/2)
	}
	if rep.PagerHits == 0 {
		t.Errorf("pager hits 0: the uffd siblings after the first must hit the shared cache")
	}
	if rep.DataDir == "" {
		t.Fatalf("the demo did not say where its data dir was")
	}
	tmp := filepath.Dir(rep.DataDir)
	if _, err := os.Stat(tmp); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the demo left %s behind (stat: %v)", tmp, err)
	}
	if ps, _ := exec.Command("pgrep", "-f", tmp).Output(); len(strings.TrimSpace(string(ps))) > 0 {
		t.Errorf("the demo left processes behind: pids %s", ps)
	}
}

// demoSteps are the steps `forkd demo` must report, in order (the demo's
// own list is internal/cli's demoStepNames; a step added there must be
// added here, with what to check of it).
func demoSteps() []string {
	return []string{"daemon", "health", "list", "create", "standby", "fork-burst", "fork-batch", "delete-source",
		"restore", "fork-answers", "standby-forks", "memory-checks"}
}

// `forkd doctor` answers without a daemon: exit 0 and every check in JSON
// for a data dir forkd can use; exit 1, naming the data dir, for one others
// can write (the twin).
func TestDoctorRunsWithoutADaemon(t *testing.T) {
	bin := buildForkd(t)
	good := filepath.Join(t.TempDir(), "data")
	out, err := exec.Command(bin, "doctor", "--data-dir", good, "-o", "json").Output()
	if err != nil {
		t.Fatalf("doctor on a usable data dir: %v\n%s", err, out)
	}
	var rs []struct{ Check, Status, Found, Without string }
	if err := json.Unmarshal(out, &rs); err != nil || len(rs) < 10 {
		t.Fatalf("doctor -o json: %v, %d checks\n%s", err, len(rs), out)
	}
	bad := t.TempDir()
	os.Chmod(bad, 0o777)
	out, err = exec.Command(bin, "doctor", "--data-dir", bad).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), "fail") || !strings.Contains(string(out), "chmod go-w") {
		t.Fatalf("doctor on a world-writable data dir: %v\n%s\nwant exit 1 saying what to fix", err, out)
	}
}
