package instance

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/testenv"
)

// jailViolations lists how the VMM of instance id (pid) is not jailed as
// it must be: a uid or gid 0, a root directory that is not its own guest
// dir, the daemon's network namespace, a cgroup without the configured
// memory limit, no seccomp filter. "" items are left out.
func jailViolations(t *testing.T, m *Manager, id string, pid int, memMiB int) []string {
	t.Helper()
	var bad []string
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		k, v, _ := strings.Cut(line, ":")
		switch k {
		case "Uid", "Gid":
			for _, f := range strings.Fields(v) {
				if f == "0" {
					bad = append(bad, fmt.Sprintf("%s has a 0: %s", k, strings.TrimSpace(v)))
					break
				}
			}
		case "Seccomp":
			if strings.TrimSpace(v) != "2" {
				bad = append(bad, "Seccomp: "+strings.TrimSpace(v)+", want 2 (a filter)")
			}
		}
	}
	g, _ := m.layout.Guest(id)
	var root, dir, ns, self syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d/root", pid), &root); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Stat(g.Dir, &dir); err != nil {
		t.Fatal(err)
	}
	if root.Dev != dir.Dev || root.Ino != dir.Ino {
		bad = append(bad, fmt.Sprintf("its root is not its guest dir %s", g.Dir))
	}
	syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &ns)
	syscall.Stat("/proc/self/ns/net", &self)
	if ns.Ino == self.Ino {
		bad = append(bad, "it shares the daemon's network namespace")
	}
	limit, err := jail.ProcessMemoryLimit(pid)
	if want := int64(memMiB)<<20 + m.cfg.Jail.MemoryOverhead; err != nil || limit != want {
		bad = append(bad, fmt.Sprintf("its cgroup's memory limit is %d (%v), want %d", limit, err, want))
	}
	return bad
}

// vmmCall sends one request to a VMM's API (the test-only requests of a
// forkd built with the forkd_testhooks tag).
func vmmCall(t *testing.T, m *Manager, id, method, path string, body any) (int, string) {
	t.Helper()
	code, text, err := vmmTry(m, id, method, path, body)
	if err != nil {
		t.Fatalf("%s %s to %s's VMM: %v", method, path, id, err)
	}
	return code, text
}

func vmmTry(m *Manager, id, method, path string, body any) (int, string, error) {
	g, _ := m.layout.Guest(id)
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", g.VMMSock())
	}}}
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest(method, "http://vmm"+path, bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	var out bytes.Buffer
	out.ReadFrom(resp.Body)
	return resp.StatusCode, out.String(), nil
}

// The test harness tells a data dir's jail cgroups by their name
// (testenv.Main's check for leftovers): forkd-<the data dir's tag>.
func TestJailParentCgroupIsNamedForTheLeftoverCheck(t *testing.T) {
	l, err := guestdir.New("/var/lib/forkd")
	if err != nil {
		t.Fatal(err)
	}
	if tag, ok := testenv.JailParentCgroupTag(jailParentCgroup(l)); !ok || tag != testenv.DataDirTag(l.Root()) {
		t.Errorf("testenv.JailParentCgroupTag(%q) = %q, %v; want %q", jailParentCgroup(l), tag, ok, testenv.DataDirTag(l.Root()))
	}
}

// Every VMM the manager runs is jailed: its own uid and gid (never 0), its
// guest dir as its root, a network namespace that is not the daemon's nor
// another VMM's, a cgroup holding it to its RAM plus the overhead, and the
// emulator's seccomp filter, whether it was booted, restored (File and
// Uffd) or forked. The twin runs the same checks on an unjailed manager and finds
// every one broken.
func TestEveryVMMIsJailed(t *testing.T) {
	needUffd(t)
	m := newTestManager(t)
	ctx := context.Background()
	createRunning(t, m, "booted")
	createRunning(t, m, "file")
	action(t, m, "file", "standby")
	fork(t, m, "file", api.ForkRequest{Name: "uffd-fork", TargetState: api.StateRunning, RestoreBackend: api.BackendUffd})
	action(t, m, "file", "restore")
	fork(t, m, "booted", api.ForkRequest{Name: "live", FromRunning: true})
	uids := map[string]string{}
	nets := map[uint64]string{} // none of them is networked: each has an empty namespace of its own
	for _, name := range []string{"booted", "file", "uffd-fork", "live"} {
		in, err := m.GetInstance(ctx, name)
		if err != nil || in.State != api.StateRunning {
			t.Fatalf("%s: %+v %v; want Running", name, in, err)
		}
		if bad := jailViolations(t, m, in.ID, in.Pid, in.MemoryMiB); len(bad) > 0 {
			t.Errorf("%s's VMM (pid %d) is not jailed: %s", name, in.Pid, strings.Join(bad, "; "))
		}
		uid, _ := procUID(in.Pid)
		if other, taken := uids[strconv.Itoa(uid)]; taken {
			t.Errorf("%s and %s run as the same uid %d", name, other, uid)
		}
		uids[strconv.Itoa(uid)] = name
		ns := nsInode(t, "/proc/"+itoa(in.Pid)+"/ns/net")
		if other, shared := nets[ns]; shared {
			t.Errorf("%s and %s share a network namespace: two escaped VMMs could meet on its loopback", name, other)
		}
		nets[ns] = name
		verifyGuest(t, m, in.ID)
	}

	// The twin: an unjailed VMM without its seccomp filter fails every
	// one of the checks.
	plain := newTestManager(t, unjailed, func(c *Config) { c.VMM.Args = append(c.VMM.Args, "--no-seccomp") })
	in := createRunning(t, plain, "plain")
	bad := strings.Join(jailViolations(t, plain, in.ID, in.Pid, in.MemoryMiB), "; ")
	for _, check := range []string{"Uid has a 0", "Gid has a 0", "Seccomp: 0", "root is not its guest dir", "daemon's network namespace", "memory limit"} {
		if !strings.Contains(bad, check) {
			t.Errorf("an unconfined VMM passes the %q check (found: %s): that check cannot fail", check, bad)
		}
	}
	if h := plain.Health(); h.Jailer != "none" || len(h.Warnings) == 0 {
		t.Errorf("Health of an unjailed manager = %+v, want jailer none with a warning", h)
	}
	if h := m.Health(); h.Jailer == "none" || len(h.Warnings) != 0 {
		t.Errorf("Health of a jailed manager = %+v", h)
	}
}

// From inside its jail a VMM (acting through the test-only request, as a
// compromised one would) can open none of: another VM's mem-file, the data
// dir's forkd.db, /etc/shadow. Its own files it can. The twin: the same
// opens from an unjailed VMM succeed.
func TestAJailedVMMReachesNothingOutsideItsJail(t *testing.T) {
	for _, jailed := range []bool{true, false} {
		t.Run(fmt.Sprintf("jailed=%v", jailed), func(t *testing.T) {
			var opts []testOpt
			if !jailed {
				opts = append(opts, unjailed)
			}
			m := newTestManager(t, opts...)
			other := createRunning(t, m, "other")
			action(t, m, "other", "standby")
			vm := createRunning(t, m, "vm")
			og, _ := m.layout.Guest(other.ID)
			for _, p := range []string{og.Latest().Memory(), m.layout.DB(), "/etc/shadow"} {
				code, text := vmmCall(t, m, vm.ID, "PUT", "/test/open", map[string]any{"path": p})
				if jailed && code != 400 {
					t.Errorf("a jailed VMM opened %s: %d %s", p, code, text)
				}
				if !jailed && code != 204 {
					t.Errorf("an unjailed VMM could not open %s (%d %s): the twin shows nothing", p, code, text)
				}
			}
			// Its own disk, by the path it knows it under.
			if code, text := vmmCall(t, m, vm.ID, "PUT", "/test/open", map[string]any{"path": "rootfs.ext4", "write": true}); code != 204 {
				t.Errorf("the VMM cannot open its own disk for writing: %d %s", code, text)
			}
		})
	}
}

// No VMM can write a mem-file another VM or the store shares: a restored
// VM whose base a fork and a snapshot also link sees it root-owned and
// read-only, and opening it for writing from inside fails; every inode
// under the data dir with more than one link is sealed. The twin turns
// sealing off (a VMM then writes the shared inode) and the check catches
// it.
func TestAVMMCannotWriteASharedMemFile(t *testing.T) {
	for _, guard := range []bool{true, false} {
		t.Run(fmt.Sprintf("sealed=%v", guard), func(t *testing.T) {
			opts := []testOpt{}
			if !guard {
				opts = append(opts, func(c *Config) { c.DisableSealing = true })
			}
			m := newTestManager(t, opts...)
			ctx := context.Background()
			src := createRunning(t, m, "src")
			action(t, m, "src", "standby")
			fork(t, m, "src", api.ForkRequest{Name: "kid"})
			if _, err := m.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "snap"}); err != nil {
				t.Fatal(err)
			}
			action(t, m, "src", "restore")
			g, _ := m.layout.Guest(src.ID)
			if st := fingerprint(t, g.Base().Memory()); st.nlink < 3 {
				t.Fatalf("the restored base has %d links, want >= 3 (fork, snapshot)", st.nlink)
			}
			code, text := vmmCall(t, m, src.ID, "PUT", "/test/open", map[string]any{"path": "snapshots/snapshot-base/memory", "write": true})
			unsealed := jail.UnsealedLinks(m.layout.Root())
			if guard {
				if code != 400 {
					t.Errorf("the VMM opened the mem-file its fork and snapshot share for writing: %d %s", code, text)
				}
				if len(unsealed) > 0 {
					t.Errorf("shared inodes not sealed: %v", unsealed)
				}
				return
			}
			if code != 204 || len(unsealed) == 0 {
				t.Errorf("with sealing off: open for writing %d %s, unsealed %v; want both to show the breach", code, text, unsealed)
			}
		})
	}
}

// Running out of uids is a clear 409 jail_uids_exhausted, and frees again
// when a VMM ends.
func TestNoUIDLeftIsAClearConflict(t *testing.T) {
	m := newTestManager(t, func(c *Config) { c.Jail.UIDs.Last = c.Jail.UIDs.First })
	createRunning(t, m, "one")
	ctx := context.Background()
	_, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "two", MemoryMiB: testMemMiB})
	if !errors.Is(err, api.ErrJailUIDsExhausted) || !strings.Contains(err.Error(), "jail_uid_range") {
		t.Fatalf("second VMM with one uid: %v; want ErrJailUIDsExhausted naming jail_uid_range", err)
	}
	action(t, m, "one", "standby")
	if _, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "three", MemoryMiB: testMemMiB}); err != nil {
		t.Fatalf("a VMM once the uid is free again: %v", err)
	}
}

// A VMM killed by its seccomp filter (a system call it may not make) or
// by its cgroup's memory limit becomes Error with the cause in its error,
// and its cgroup and uid are freed.
func TestAJailKillIsErrorNamingTheCause(t *testing.T) {
	t.Run("seccomp", func(t *testing.T) {
		m := newTestManager(t)
		in := createRunning(t, m, "vm")
		// The call itself ends with the connection: the VMM is gone.
		vmmTry(m, in.ID, "PUT", "/test/violate-seccomp", struct{}{})
		got := waitState(t, m, "vm", api.StateError)
		if !strings.HasPrefix(got.Error, "seccomp violation") || !strings.Contains(got.Error, "SIGSYS") {
			t.Errorf("error = %q, want it to name the seccomp violation", got.Error)
		}
		checkJailFreed(t, m, in.ID)
	})
	t.Run("memory limit at boot", func(t *testing.T) {
		// A guest whose working set is written at boot, with almost no
		// room for the VMM beside it: the start fails, naming the cause.
		m := newTestManager(t, func(c *Config) { c.Jail.MemoryOverhead = 1 << 20 })
		_, err := m.CreateInstance(context.Background(), api.CreateInstanceRequest{Name: "vm", MemoryMiB: 64, BootArgs: "forkd.ws_mib=64"})
		if err == nil || !strings.Contains(err.Error(), "memory limit") {
			t.Fatalf("create over the memory limit: %v; want an error naming the memory limit", err)
		}
		if n := m.jail.uids.InUse(); n != 0 {
			t.Errorf("%d uids held after the failed create", n)
		}
	})
	t.Run("memory limit while running", func(t *testing.T) {
		// Parked with room to spare, restored by a daemon that allows the
		// VMM 1 MiB beyond the guest's RAM: the restore maps the mem-file
		// (page cache), and the guest, writing all its RAM as fast as it
		// can, makes private pages until the cgroup's limit kills the VMM.
		dir := shortDir(t)
		var vm api.Instance
		openAndClose(t, dir, func(m *Manager) {
			var err error
			vm, err = m.CreateInstance(context.Background(), api.CreateInstanceRequest{Name: "vm", MemoryMiB: 64, BootArgs: "forkd.ws_mib=63 forkd.write_pct=100 forkd.rate=0"})
			if err != nil {
				t.Fatal(err)
			}
			action(t, m, "vm", "standby")
		})
		m := newManagerAt(t, dir, func(c *Config) { c.Jail.MemoryOverhead = 1 << 20 })
		if _, err := m.Action(context.Background(), "vm", "restore", api.ActionRequest{}); err != nil {
			if !strings.Contains(err.Error(), "memory limit") {
				t.Fatalf("restore: %v; an error before the guest ran must name the memory limit", err)
			}
			return
		}
		got := waitState(t, m, "vm", api.StateError)
		if !strings.HasPrefix(got.Error, "memory limit") {
			t.Errorf("error = %q, want it to name the memory limit", got.Error)
		}
		checkJailFreed(t, m, vm.ID)
	})
}

func checkJailFreed(t *testing.T, m *Manager, id string) {
	t.Helper()
	if n := m.jail.uids.InUse(); n != 0 {
		t.Errorf("%d uids still held after the only VMM died", n)
	}
	cg, _ := m.jail.cgroup(id)
	for _, d := range cg.Dirs {
		if _, err := os.Stat(d); err == nil {
			t.Errorf("cgroup %s left after its VMM died", d)
		}
	}
	g, _ := m.layout.Guest(id)
	if _, err := os.Lstat(g.DevDir()); err == nil {
		t.Errorf("%s left after its VMM died", g.DevDir())
	}
}

// A running VMM owns its guest dir, so a compromised one can swap any name
// there for a symlink to what it must never reach, or for a FIFO that
// would hang a reader. Nothing the daemon then does with that VM follows
// or blocks on one: a live snapshot and a live fork (which clone its disk)
// are refused naming the file, build nothing and leave the VM Running; no
// file under the data dir ever gets the target's bytes; the target keeps
// its one link; and once the VMM is gone the plant is removed
// (sanitizeGuest). The twin: a plain open of the planted name does reach
// the target, so the refusals are what stops it.
func TestAHostileVMMsPlantsReachNothing(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "secret")
	want := bytes.Repeat([]byte("host secret "), 512)
	if err := os.WriteFile(secret, want, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, plant := range []string{"symlink", "fifo"} {
		t.Run(plant, func(t *testing.T) {
			m := newTestManager(t)
			ctx := context.Background()
			vm := createRunning(t, m, "vm")
			g, _ := m.layout.Guest(vm.ID)
			disk := g.Rootfs()
			if err := os.Rename(disk, disk+".real"); err != nil {
				t.Fatal(err)
			}
			if plant == "symlink" {
				if err := os.Symlink(secret, disk); err != nil {
					t.Fatal(err)
				}
				if b, err := os.ReadFile(disk); err != nil || !bytes.Equal(b, want) {
					t.Fatalf("twin: a plain open of the planted disk reads %d bytes (%v), not the secret: the test shows nothing", len(b), err)
				}
			} else if err := syscall.Mkfifo(disk, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := m.CreateSnapshot(ctx, "vm", api.SnapshotRequest{Name: "snap"})
			if err == nil || !strings.Contains(err.Error(), "disk") {
				t.Errorf("live snapshot over a planted disk: %v; want a refusal naming the disk", err)
			}
			_, err = m.ForkInstance(ctx, "vm", api.ForkRequest{Name: "kid", FromRunning: true})
			if err == nil || !strings.Contains(err.Error(), "disk") {
				t.Errorf("live fork over a planted disk: %v; want a refusal naming the disk", err)
			}
			if list, _ := m.ListInstances(ctx); len(list) != 1 {
				t.Errorf("instances after the refusals: %d, want the VM alone", len(list))
			}
			if snaps, _ := m.ListSnapshots(ctx); len(snaps) != 0 {
				t.Errorf("snapshots after the refusal: %v", snaps)
			}
			if in, err := m.GetInstance(ctx, "vm"); err != nil || in.State != api.StateRunning {
				t.Errorf("the VM after the refusals: %+v, %v; want Running", in, err)
			}
			filepath.WalkDir(m.layout.Root(), func(p string, d os.DirEntry, err error) error {
				if err == nil && d.Type().IsRegular() {
					if b, err := os.ReadFile(p); err == nil && bytes.Contains(b, want[:64]) {
						t.Errorf("%s holds the secret's bytes", p)
					}
				}
				return nil
			})
			var st syscall.Stat_t
			if err := syscall.Stat(secret, &st); err != nil || st.Nlink != 1 {
				t.Errorf("the secret has %d links (%v), want 1", st.Nlink, err)
			}
			action(t, m, "vm", "stop")
			if _, err := os.Lstat(disk); err == nil {
				t.Errorf("the planted %s is still there after its VMM is gone", plant)
			}
		})
	}
}
