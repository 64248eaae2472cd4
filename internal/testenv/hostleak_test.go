package testenv_test

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/testenv"
)

// cgroupRoot is a cgroup hierarchy of this host where this process can make
// a cgroup.
func cgroupRoot(t *testing.T) string {
	t.Helper()
	testenv.NeedRoot(t)
	roots, err := testenv.HostRoots()
	if err != nil {
		t.Fatal(err)
	}
	// The pids hierarchy first: one a VMM's jail uses.
	slices.SortStableFunc(roots.Cgroups, func(a, b string) int {
		rank := func(s string) int {
			if strings.Contains(filepath.Base(s), "pids") {
				return 0
			}
			return 1
		}
		return rank(a) - rank(b)
	})
	for _, r := range roots.Cgroups {
		probe := filepath.Join(r, "forkd-"+testenv.DataDirTag(t.TempDir()))
		if os.Mkdir(probe, 0o755) == nil {
			os.Remove(probe)
			return r
		}
	}
	testenv.Need(t, testenv.Cgroup, "no cgroup hierarchy here lets this process make a cgroup")
	return ""
}

// dataDirCgroup makes the jail parent cgroup, under root, of a data dir of
// the test's own (a fresh temp dir: a tag no one else has), and removes it
// (and a child) when the test ends.
func dataDirCgroup(t *testing.T, root string) (cg, dataDir string) {
	t.Helper()
	dataDir = t.TempDir()
	cg = filepath.Join(root, "forkd-"+testenv.DataDirTag(dataDir))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		os.Remove(filepath.Join(cg, "x"))
		if err := os.Remove(cg); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cleanup: %v", err)
		}
	})
	return cg, dataDir
}

// namespace makes a named network namespace and removes it when the test
// ends.
func namespace(t *testing.T, name string) string {
	t.Helper()
	p, err := network.NewNamespace(name)
	if err != nil {
		testenv.Need(t, testenv.Netns, "cannot create a network namespace: "+err.Error())
	}
	t.Cleanup(func() { network.RemoveNamespace(p) })
	return p
}

// sleeper starts a process that lives in dir until the test ends (or it
// is killed).
func sleeper(t *testing.T, dir string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "3600")
	cmd.Dir = dir
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// TestHostWatchFindsLeftovers is the twin of Main's check for forkd host
// objects left behind: real cgroups and named network namespaces, made
// before and during a watch. Reported: a data dir's cgroup and a VM
// namespace that nothing alive uses, and a test namespace of this
// process's own. Not reported: what was there before, what came and went,
// a cgroup holding a process, a cgroup or namespace whose data dir a live
// process uses, a namespace a process holds open, another process's test
// namespace. Once the process using a data dir dies, its cgroup is
// reported too.
func TestHostWatchFindsLeftovers(t *testing.T) {
	root := cgroupRoot(t)
	roots := testenv.HostObjectRoots{Cgroups: []string{root}, NetNS: testenv.NetNSDir}
	var b [4]byte
	rand.Read(b[:])
	random := hex.EncodeToString(b[:])

	before, _ := dataDirCgroup(t, root)
	w, err := testenv.WatchHost(roots)
	if err != nil {
		t.Fatal(err)
	}
	came, _ := dataDirCgroup(t, root)
	if err := os.Remove(came); err != nil {
		t.Fatal(err)
	}
	leaked, leakedDir := dataDirCgroup(t, root)
	leakedNS := namespace(t, "forkd-"+testenv.DataDirTag(leakedDir)+"-0")
	ownNS := namespace(t, testenv.TestNamespaceName("w"+random))
	otherNS := namespace(t, testenv.NamespacePrefix+"1-w"+random) // pid 1's (not this process's)

	busy, _ := dataDirCgroup(t, root)
	if err := os.Mkdir(filepath.Join(busy, "x"), 0o755); err != nil {
		t.Fatal(err)
	}
	inBusy := sleeper(t, "/")
	if err := os.WriteFile(filepath.Join(busy, "x", "cgroup.procs"), []byte(strconv.Itoa(inBusy.Process.Pid)), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inBusy.Process.Kill(); inBusy.Wait() }) // before the cgroup's removal

	used, usedDir := dataDirCgroup(t, root)
	usedNS := namespace(t, "forkd-"+testenv.DataDirTag(usedDir)+"-1")
	user := sleeper(t, usedDir)

	heldNS := namespace(t, "forkd-"+testenv.DataDirTag(t.TempDir())+"-2")
	h, err := netns.GetFromPath(heldNS)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()

	// Other tests on this host may make objects meanwhile: only this
	// test's count.
	mine := []string{before, came, leaked, leakedNS, ownNS, otherNS, busy, used, usedNS, heldNS}
	leftovers := func() ([]string, error) {
		all, err := w.Leftovers(0)
		return slices.DeleteFunc(all, func(o string) bool { return !slices.Contains(mine, o) }), err
	}
	want := []string{leaked, leakedNS, ownNS}
	slices.Sort(want)
	got, err := leftovers()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("leftovers %v, want %v (before %s, busy %s, used %s %s, held %s)", got, want, before, busy, used, usedNS, heldNS)
	}

	// Nothing uses the data dir any more: its cgroup and namespace are
	// leftovers now.
	user.Process.Kill()
	user.Wait()
	want = append(want, used, usedNS)
	slices.Sort(want)
	if got, err = leftovers(); err != nil || !slices.Equal(got, want) {
		t.Fatalf("once the data dir's user is gone: leftovers %v (%v), want %v", got, err, want)
	}
	if r := testenv.HostLeftoverReport(got); !strings.Contains(r, leaked) || !strings.Contains(r, "instance.RemoveJailCgroups") {
		t.Errorf("the report does not name the cgroup and the fix:\n%s", r)
	}
}

// envLeave makes TestLeaveACgroupWhenAsked leave the cgroup it names.
const envLeave = "FORKD_TESTENV_LEAVE_CGROUP"

// TestLeaveACgroupWhenAsked is TestMainFailsABinaryThatLeavesACgroup's
// helper: run in a child test binary, it makes the cgroup envLeave names
// and leaves it. Otherwise it does nothing.
func TestLeaveACgroupWhenAsked(t *testing.T) {
	if cg := os.Getenv(envLeave); cg != "" {
		if err := os.Mkdir(cg, 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// TestMainFailsABinaryThatLeavesACgroup: a test binary (this one, run
// again) one of whose tests leaves a data dir's cgroup fails, naming it,
// though every test passed.
func TestMainFailsABinaryThatLeavesACgroup(t *testing.T) {
	root := cgroupRoot(t)
	cg := filepath.Join(root, "forkd-"+testenv.DataDirTag(filepath.Join(t.TempDir(), "data")))
	t.Cleanup(func() {
		if err := os.Remove(cg); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cleanup: %v", err)
		}
	})
	cmd := exec.Command(os.Args[0], "-test.run", "^TestLeaveACgroupWhenAsked$", "-test.count=1")
	cmd.Env = append(os.Environ(), envLeave+"="+cg, testenv.EnvLeftoverGrace+"=0s")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).ExitStatus() != 1 {
		t.Fatalf("a test binary that left %s: %v, want exit status 1\n%s", cg, err, out.String())
	}
	if !strings.Contains(out.String(), "forkd host object(s) appeared") || !strings.Contains(out.String(), cg) {
		t.Fatalf("the failure does not name the cgroup %s:\n%s", cg, out.String())
	}
	if _, err := os.Stat(cg); err != nil {
		t.Fatalf("the helper did not leave %s: %v", cg, err)
	}
}
