package reliability

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/testenv"
)

// TestInvariantCheckerCatchesEachViolation is the twin of every test that
// relies on CheckInvariants passing: each planted violation must be
// reported, and a clean daemon must pass.
func TestInvariantCheckerCatchesEachViolation(t *testing.T) {
	d := newDaemon(t, nil)
	in := createRunning(t, d.Client, "vm")
	g, _ := d.Layout.Guest(in.ID)
	in2 := createStandby(t, d.Client, "vm2")
	action(t, d.Client, "vm2", "restore")
	g2, _ := d.Layout.Guest(in2.ID)
	ctx := ctxT(t, 30*time.Second)
	if err := CheckInvariants(ctx, d); err != nil {
		t.Fatalf("a clean daemon fails the invariants: %v", err)
	}

	cases := []struct {
		name  string
		plant func(t *testing.T) (undo func())
		want  string
	}{
		{"temp file in a guest dir", func(t *testing.T) func() {
			p := filepath.Join(g.Dir, "memory.unshare.tmp")
			os.WriteFile(p, []byte("x"), 0o600)
			return func() { os.Remove(p) }
		}, "leftover temp file"},
		{"dir with no record", func(t *testing.T) func() {
			p := filepath.Join(d.Layout.JailsDir(), "0123456789abcdef01234567")
			os.Mkdir(p, 0o700)
			return func() { os.Remove(p) }
		}, "no record"},
		{"unknown file at the top", func(t *testing.T) func() {
			p := filepath.Join(d.Layout.Root(), "stray")
			os.WriteFile(p, nil, 0o600)
			return func() { os.Remove(p) }
		}, "unexpected entry"},
		{"a VMM writes a file with two links", func(t *testing.T) func() {
			// The VMM holds its log open for writing: a second link to it
			// makes that a shared inode open for writing.
			p := filepath.Join(d.Layout.JailsDir(), "..", "shared-link")
			if err := os.Link(g.VMMLog(), p); err != nil {
				t.Fatal(err)
			}
			return func() { os.Remove(p) }
		}, "shared inode writable"},
		{"a VMM no instance owns", func(t *testing.T) func() {
			dir := filepath.Join(d.Layout.JailsDir(), ".tmp-stray")
			os.MkdirAll(dir, 0o700)
			cmd := exec.Command(forkdBinary(t), "vmm", "--api-sock", filepath.Join(dir, "vmm.sock"))
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// Until it has exec'd, the child's command line is ours.
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
				if len(ProcessesUnder(dir)) > 0 {
					break
				}
			}
			return func() { cmd.Process.Kill(); cmd.Wait(); os.RemoveAll(dir) }
		}, "leaked VMM"},
		{"a mapped mem-file linked only by another dir", func(t *testing.T) func() {
			// vm2 runs on a File restore of its base: rename a copy over
			// that name (an unshare with no pin) after linking the mapped
			// inode from elsewhere.
			base := g2.Base().Memory()
			stray := filepath.Join(d.Layout.Root(), "stray-link")
			if err := os.Link(base, stray); err != nil {
				t.Fatal(err)
			}
			data, _ := os.ReadFile(base)
			os.WriteFile(base+".new", data, 0o600)
			os.Rename(base+".new", base)
			return func() { os.Remove(stray) }
		}, "not counted in its link count"},
		{"a recording of another key under a key's name", func(t *testing.T) func() {
			os.MkdirAll(d.Layout.PrefetchDir(), 0o700)
			p, _ := d.Layout.WorkingSet("0123456789abcdef01234567")
			err := prefetch.Write(p, prefetch.Recording{Key: "ffffffffffffffffffffffff", PageSize: 4096, FileSize: 4096,
				Source: prefetch.SourceUffd, Pages: []uint64{0}})
			if err != nil {
				t.Fatal(err)
			}
			return func() { os.Remove(p) }
		}, "records key ffffffffffffffffffffffff"},
		{"a torn recording", func(t *testing.T) func() {
			os.MkdirAll(d.Layout.PrefetchDir(), 0o700)
			p, _ := d.Layout.WorkingSet("0123456789abcdef01234567")
			os.WriteFile(p, []byte("FORKDWS1 and then nothing"), 0o600)
			return func() { os.Remove(p) }
		}, "recording 0123456789abcdef01234567.ws"},
		{"a second link to an inode a VMM may write", func(t *testing.T) func() {
			// vm2's base after its restore is sealed; a link to its disk
			// (its VMM's to write) is a shared inode that is not.
			p := filepath.Join(d.Layout.Root(), "exec", "stray-disk-link")
			if err := os.Link(g2.Rootfs(), p); err != nil {
				t.Fatal(err)
			}
			return func() { os.Remove(p) }
		}, "shared inode a VMM could write"},
		{"an instance whose dir is gone", func(t *testing.T) func() {
			os.Rename(g.Dir, g.Dir+"-moved")
			return func() { os.Rename(g.Dir+"-moved", g.Dir) }
		}, "guest dir"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			undo := tc.plant(t)
			err := CheckInvariants(context.Background(), d)
			undo()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("planted %q: CheckInvariants = %v, want an error containing %q", tc.name, err, tc.want)
			}
		})
	}
	if err := CheckInvariants(ctx, d); err != nil {
		t.Fatalf("after undoing every plant: %v", err)
	}
}

// The jail checks of CheckInvariants can fail: a process that is not
// confined (a child of this test, run as root in the host's namespaces, no
// filter, in a memory cgroup of its own without a limit) breaks every one
// of them; given a memory limit, that check passes.
func TestJailChecksCatchAnUnconfinedProcess(t *testing.T) {
	testenv.NeedJail(t, jail.HostCgroups)
	mounts, err := jail.ReadMounts(jail.MountTable)
	if err != nil {
		t.Fatal(err)
	}
	version, err := mounts.Version(jail.Controllers...)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cg, err := mounts.Locate(version, "forkd-twin-"+network.Tag(dir), "unconfined", []string{"memory"})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(cg.Dirs["memory"], 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := mounts.RemoveTree(version, "forkd-twin-"+network.Tag(dir), []string{"memory"}); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	child := exec.Command("sleep", "600")
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer child.Wait()
	defer child.Process.Kill()
	if err := os.WriteFile(filepath.Join(cg.Dirs["memory"], "cgroup.procs"), []byte(strconv.Itoa(child.Process.Pid)), 0o644); err != nil {
		t.Fatal(err)
	}
	bad := strings.Join(jailBreaches(child.Process.Pid, os.Getpid(), dir), "; ")
	for _, want := range []string{"Uid", "Gid", "Seccomp", "root is not", "network namespace", "no memory limit"} {
		if !strings.Contains(bad, want) {
			t.Errorf("jailBreaches of an unconfined process misses %q: %s", want, bad)
		}
	}
	file := "memory.limit_in_bytes"
	if version == 2 {
		file = "memory.max"
	}
	if err := os.WriteFile(filepath.Join(cg.Dirs["memory"], file), []byte("1073741824"), 0o644); err != nil {
		t.Fatal(err)
	}
	if bad := strings.Join(jailBreaches(child.Process.Pid, os.Getpid(), dir), "; "); strings.Contains(bad, "memory limit") {
		t.Errorf("a process held to 1 GiB still breaks the memory limit check: %s", bad)
	}
}
