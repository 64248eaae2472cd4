package reliability

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/emulator"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/testenv"
	"github.com/forkd/forkd/internal/testfs"
)

// fakeVMMEnv makes the test binary act as a VMM (see fakeVMM).
const fakeVMMEnv = "FORKD_RELIABILITY_FAKE_VMM"

// fakeVMM is a VMM that speaks just enough of Firecracker's API to be
// launched (GET / and GET /version answer) and then, in mode "die-on-load", SIGKILLs itself
// when PUT /snapshot/load arrives: a VMM dying in the middle of a restore,
// deterministically.
func fakeVMM(mode string, args []string) int {
	sock := ""
	for i, a := range args {
		if a == "--api-sock" && i+1 < len(args) {
			sock = args[i+1]
		}
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake vmm:", err)
		return 1
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"app_name":"Firecracker","id":"fake","state":"Not started","vmm_version":"1.16.1"}`)
	})
	mux.HandleFunc("GET /version", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"firecracker_version":"1.16.1"}`)
	})
	mux.HandleFunc("PUT /snapshot/load", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		fmt.Fprintln(os.Stderr, "fake vmm: dying in the middle of /snapshot/load")
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	http.Serve(ln, mux)
	return 0
}

// faultyVMM writes a VMM wrapper whose behaviour a test switches by writing
// a mode file: "ok" runs the real `forkd vmm`; "exit" dies at once; "mute"
// never creates its API socket; "die-on-load" dies in the middle of PUT
// /snapshot/load (fakeVMM); "crash-vmstate" and "crash-memory" run the real
// `forkd vmm`, which dies halfway through writing that file of its next
// snapshot (emulator.CrashAtEnv). The name starts with "forkd" so the daemon
// drives it as the emulator. It returns the wrapper path and a function
// setting the mode.
func faultyVMM(t *testing.T) (string, func(mode string)) {
	t.Helper()
	dir := t.TempDir()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	mode := filepath.Join(dir, "mode")
	script := filepath.Join(dir, "forkd-faulty")
	body := fmt.Sprintf(`#!/bin/sh
real=%q
case "$(cat %q)" in
exit) echo "faulty vmm: exiting at start" >&2; exit 3 ;;
mute) exec sleep 3600 ;;
die-on-load) exec env %s=die-on-load %q "$@" ;;
crash-vmstate) exec env %s=vmstate "$real" "$@" ;;
crash-memory) exec env %s=memory "$real" "$@" ;;
*) exec "$real" "$@" ;;
esac
`, forkdBinary(t), mode, fakeVMMEnv, self, emulator.CrashAtEnv, emulator.CrashAtEnv)
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	set := func(m string) {
		if err := os.WriteFile(mode, []byte(m), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	set("ok")
	return script, set
}

func fileSum(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// expectStandbyAfterFailedRestore checks a restore failed with a reason (to
// the caller) and left the instance Standby, with no stored error, and its
// snapshot files unchanged.
func expectStandbyAfterFailedRestore(t *testing.T, d *Daemon, ref string, err error, files map[string]string) {
	t.Helper()
	if err == nil {
		t.Fatalf("restore of %s succeeded, want a failure", ref)
	}
	var se *api.StatusError
	if !errors.As(err, &se) || se.Message == "" {
		t.Errorf("restore failure is not an API error with a message: %v", err)
	}
	in, gerr := d.Client.GetInstance(ctxT(t, 10*time.Second), ref)
	if gerr != nil {
		t.Fatal(gerr)
	}
	if in.State != api.StateStandby || in.Error != "" {
		t.Errorf("after a failed restore %s is %s with error %q; want Standby with no stored error (the caller got the reason)", ref, in.State, in.Error)
	}
	for p, sum := range files {
		if got := fileSum(t, p); got != sum {
			t.Errorf("%s changed during the failed restore", p)
		}
	}
	addFigure("faults_injected", 1)
}

func snapshotSums(t *testing.T, g guestdir.Guest) map[string]string {
	return map[string]string{
		g.Latest().Memory():  fileSum(t, g.Latest().Memory()),
		g.Latest().VMState(): fileSum(t, g.Latest().VMState()),
	}
}

// TestVMMFaultsDuringRestoreLeaveTheInstanceStandby restores through a VMM
// that exits at start, never opens its socket, or dies while the snapshot
// loads. Each restore fails with a reason; the instance stays Standby with
// its files unchanged, no VMM is left behind, and once the VMM behaves the
// same instance restores with its memory intact.
func TestVMMFaultsDuringRestoreLeaveTheInstanceStandby(t *testing.T) {
	t.Parallel()
	vmm, setMode := faultyVMM(t)
	// The faulty VMM is a shell script around forkd: no jail could run it
	// (a jail has no shell, no dynamic loader).
	d := newDaemon(t, nil, "--vmm-binary", vmm, "--vmm-jailer", "none")
	src := createStandby(t, d.Client, "src")
	g, _ := d.Layout.Guest(src.ID)
	sums := snapshotSums(t, g)
	for _, mode := range []string{"exit", "die-on-load", "mute"} {
		t.Run(mode, func(t *testing.T) {
			setMode(mode)
			_, err := d.Client.Action(ctxT(t, 60*time.Second), "src", "restore", api.ActionRequest{})
			expectStandbyAfterFailedRestore(t, d, "src", err, sums)
			checkAll(t, d)
		})
	}
	setMode("ok")
	if _, err := Exercise(ctxT(t, 60*time.Second), d.Client); err != nil {
		t.Errorf("after the VMM faults: %v", err)
	}
	checkAll(t, d)
}

// TestDamagedSnapshotFilesAreRefused truncates a Standby instance's
// mem-file (to half and to nothing) and corrupts its vmstate: each restore
// is refused with a clear error and the instance stays Standby; with the
// files put back it restores with its memory intact.
func TestDamagedSnapshotFilesAreRefused(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil)
	src := createStandby(t, d.Client, "src")
	g, _ := d.Layout.Guest(src.ID)
	mem, vmstate := g.Latest().Memory(), g.Latest().VMState()
	keep := t.TempDir()
	backup := func(p string) string {
		b := filepath.Join(keep, filepath.Base(p))
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(b, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return b
	}
	memBak, stateBak := backup(mem), backup(vmstate)
	put := func(from, to string) {
		data, _ := os.ReadFile(from)
		if err := os.WriteFile(to, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	st, _ := os.Stat(mem)
	cases := []struct {
		name   string
		damage func()
	}{
		{"mem-file truncated to half", func() { os.Truncate(mem, st.Size()/2) }},
		{"mem-file truncated to one page short", func() { os.Truncate(mem, st.Size()-4096) }},
		{"mem-file empty", func() { os.Truncate(mem, 0) }},
		{"vmstate with a flipped byte", func() {
			b, _ := os.ReadFile(vmstate)
			b[len(b)/2] ^= 0x40
			os.WriteFile(vmstate, b, 0o600)
		}},
		{"vmstate truncated", func() {
			b, _ := os.ReadFile(vmstate)
			os.WriteFile(vmstate, b[:len(b)/3], 0o600)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.damage()
			damaged := snapshotSums(t, g)
			_, err := d.Client.Action(ctxT(t, 30*time.Second), "src", "restore", api.ActionRequest{})
			if err == nil {
				// Give a VM that came up on a damaged mem-file a moment to
				// touch it, so the failure shows in the report.
				time.Sleep(300 * time.Millisecond)
				in, _ := d.Client.GetInstance(ctxT(t, 10*time.Second), "src")
				t.Fatalf("restore with %s succeeded: %s, memory_check %q", tc.name, in.State, in.MemoryCheck)
			}
			expectStandbyAfterFailedRestore(t, d, "src", err, damaged)
			if !strings.Contains(strings.ToLower(err.Error()), "size") && !strings.Contains(strings.ToLower(err.Error()), "crc") &&
				!strings.Contains(strings.ToLower(err.Error()), "short") && !strings.Contains(strings.ToLower(err.Error()), "truncat") &&
				!strings.Contains(strings.ToLower(err.Error()), "corrupt") && !strings.Contains(strings.ToLower(err.Error()), "vmstate") {
				t.Logf("note: the refusal does not name the damage: %v", err)
			}
			put(memBak, mem)
			put(stateBak, vmstate)
			checkAll(t, d)
		})
	}
	if _, err := Exercise(ctxT(t, 60*time.Second), d.Client); err != nil {
		t.Errorf("with the files put back: %v", err)
	}
}

// TestFullFilesystemFailsCleanly runs the data dir on a small ext4, then
// XFS, loopback filesystem and fills it: standby, fork and snapshot fail with
// an error (no hang, no 2xx), the source stays intact and operable, nothing
// half-made is left; with space freed everything works again.
func TestFullFilesystemFailsCleanly(t *testing.T) {
	t.Parallel()
	// ext4 copies on unshare; XFS reflinks, so there the unshare succeeds
	// on a full filesystem and the diff's copy-on-write runs out instead.
	for _, kind := range []testfs.Kind{testfs.Ext4, testfs.XFS} {
		t.Run(string(kind), func(t *testing.T) {
			t.Parallel()
			fullFilesystemFailsCleanly(t, kind)
		})
	}
}

func fullFilesystemFailsCleanly(t *testing.T, kind testfs.Kind) {
	fs := testfs.Mount(t, kind, 384<<20)
	d := newDaemonIn(t, fs.Dir, nil)
	src := createStandby(t, d.Client, "src")
	createRunning(t, d.Client, "run")
	// shared runs on a File restore of a mem-file its Standby fork also
	// links: its standby must unshare (copy 32 MiB) before the diff.
	createStandby(t, d.Client, "shared")
	if _, err := d.Client.ForkInstance(ctxT(t, 30*time.Second), "shared", api.ForkRequest{Name: "shared-kid"}); err != nil {
		t.Fatal(err)
	}
	action(t, d.Client, "shared", "restore")
	g, _ := d.Layout.Guest(src.ID)
	sums := snapshotSums(t, g)
	kid, _ := d.Client.GetInstance(ctxT(t, 10*time.Second), "shared-kid")
	gk, _ := d.Layout.Guest(kid.ID)
	kidSums := snapshotSums(t, gk)

	filler := filepath.Join(fs.Dir, "filler")
	// fill grows the filler until at most leave bytes are free.
	fill := func(leave int64) {
		f, err := os.OpenFile(filler, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		buf := make([]byte, 1<<20)
		for {
			var st syscall.Statfs_t
			if err := syscall.Statfs(fs.Dir, &st); err != nil {
				t.Fatal(err)
			}
			// Root (the daemon here) may also use ext4's reserved blocks.
			free := int64(st.Bfree) * int64(st.Bsize)
			if free <= leave {
				break
			}
			n := int64(len(buf))
			if free-leave < n {
				n = max(free-leave, 4096)
			}
			if _, err := f.Write(buf[:n]); err != nil {
				if !errors.Is(err, syscall.ENOSPC) {
					t.Fatal(err)
				}
				break
			}
		}
		f.Sync()
	}
	ctx := ctxT(t, 120*time.Second)
	attempts := func(stage int) []struct {
		name string
		do   func() error
	} {
		return []struct {
			name string
			do   func() error
		}{
			{"standby of a running VM", func() error { _, err := d.Client.Action(ctx, "run", "standby", api.ActionRequest{}); return err }},
			{"standby that must unshare a base first", func() error {
				_, err := d.Client.Action(ctx, "shared", "standby", api.ActionRequest{})
				return err
			}},
			{"live snapshot", func() error {
				_, err := d.Client.CreateSnapshot(ctx, "run", api.SnapshotRequest{Name: fmt.Sprintf("snap-live-%d", stage)})
				return err
			}},
			{"live fork", func() error {
				_, err := d.Client.ForkInstance(ctx, "run", api.ForkRequest{Name: fmt.Sprintf("live-kid-%d", stage), FromRunning: true})
				return err
			}},
			{"fork of the standby source", func() error {
				_, err := d.Client.ForkInstance(ctx, "src", api.ForkRequest{Name: fmt.Sprintf("kid-%d", stage)})
				return err
			}},
			{"create", func() error {
				_, err := d.Client.CreateInstance(ctx, api.CreateInstanceRequest{Name: fmt.Sprintf("new-%d", stage), MemoryMiB: testMemMiB, BootArgs: testBootArgs})
				return err
			}},
		}
	}
	// Nearly full (the metadata still fits, a 32 MiB mem-file does not),
	// then full.
	for stage, leave := range []int64{6 << 20, 0} {
		for _, a := range attempts(stage) {
			fill(leave) // a failed attempt frees what it half wrote
			err := a.do()
			addFigure("faults_injected", 1)
			if err == nil {
				// Some operations need little space (a fork hardlinks):
				// fine, as long as the invariants hold afterwards.
				t.Logf("%d bytes free: %s succeeded", leave, a.name)
			} else {
				var se *api.StatusError
				if !errors.As(err, &se) || se.Message == "" {
					t.Errorf("%s on a full filesystem: %v, want an API error with a message", a.name, err)
				}
				t.Logf("%d bytes free: %s failed: %v", leave, a.name, err)
			}
			if got := snapshotSums(t, g); got[g.Latest().Memory()] != sums[g.Latest().Memory()] {
				t.Fatalf("%s changed the standby source's mem-file", a.name)
			}
			if got := snapshotSums(t, gk); got[gk.Latest().Memory()] != kidSums[gk.Latest().Memory()] {
				t.Fatalf("%s changed the mem-file a Standby fork shares", a.name)
			}
		}
	}
	// The instances that failed to stand by must still be running (or Standby).
	for _, name := range []string{"run", "shared"} {
		if in, err := d.Client.GetInstance(ctx, name); err != nil || (in.State != api.StateRunning && in.State != api.StateStandby) {
			t.Errorf("after a failed standby on a full fs, %s is %+v (%v)", name, in.State, err)
		}
	}
	os.Remove(filler)
	checkAll(t, d)
	if _, err := d.Client.ForkInstance(ctx, "src", api.ForkRequest{Name: "kid2"}); err != nil {
		t.Errorf("fork with space freed: %v", err)
	}
	if _, err := Exercise(ctx, d.Client); err != nil {
		t.Errorf("with space freed: %v", err)
	}
	checkAll(t, d)
}

// TestVMMKilledWhileRunningIsReported SIGKILLs the VMM of a Running
// instance (an OOM kill, say). The daemon must stay responsive and stop
// calling the instance Running on its own (the exit is an event its
// supervisor sees, not something a read has to discover): the instance
// becomes Stopped with the reason; it can be started again, and its Standby
// fork (which holds its own link to the memory) is unaffected.
func TestVMMKilledWhileRunningIsReported(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil)
	createStandby(t, d.Client, "src")
	if _, err := d.Client.ForkInstance(ctxT(t, 30*time.Second), "src", api.ForkRequest{Name: "kid"}); err != nil {
		t.Fatal(err)
	}
	in := action(t, d.Client, "src", "restore")
	if err := syscall.Kill(in.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	addFigure("faults_injected", 1)
	if got := waitState(t, d.Client, "src", api.StateStopped); !strings.Contains(got.Error, "SIGKILL") {
		t.Errorf("after its VMM was killed: Stopped with error %q; want the reason (killed by SIGKILL)", got.Error)
	}
	// A Stopped instance cannot be paused.
	if _, err := d.Client.Action(ctxT(t, 30*time.Second), "src", "pause", api.ActionRequest{}); err == nil {
		t.Errorf("pause of an instance whose VMM is dead succeeded")
	}
	got, _ := d.Client.GetInstance(ctxT(t, 10*time.Second), "src")
	if got.State == api.StateRunning || got.Error == "" {
		t.Errorf("after an action, the instance whose VMM died is %s with error %q", got.State, got.Error)
	}
	checkAll(t, d)
	if _, err := Exercise(ctxT(t, 60*time.Second), d.Client); err != nil {
		t.Errorf("after the VMM died: %v", err)
	}
	checkAll(t, d)
}

// TestVMMDyingMidSnapshotWriteLeavesNothingTorn kills the VMM halfway
// through writing the vmstate (which Firecracker rewrites in place, so a
// standby into an existing base tears the old one) or the mem-file, in a
// first standby (Full, new files), a standby of a restored VM (Diff into
// the base, vmstate rewritten in place) and a snapshot of a running VM (its
// base). The operation fails with the reason; no record points at the torn
// files (no Standby instance, no ready snapshot, no snapshot dir left to
// load); the instance is Stopped (its memory died with the VMM) and starts
// afresh.
func TestVMMDyingMidSnapshotWriteLeavesNothingTorn(t *testing.T) {
	t.Parallel()
	script, setMode := faultyVMM(t)
	// Unjailed: the faulty VMM is a shell script, which an empty jail
	// cannot run (the crash hook itself is jail-agnostic).
	d := newDaemon(t, nil, "--vmm-binary", script, "--vmm-jailer", "none")
	ctx := func() context.Context { return ctxT(t, 60*time.Second) }
	for _, point := range []string{"vmstate", "memory"} {
		for _, op := range []string{"first standby", "standby after restore", "live snapshot"} {
			name := strings.ReplaceAll(point+"-"+op, " ", "-")
			t.Run(name, func(t *testing.T) {
				setMode("ok")
				switch op {
				case "first standby", "live snapshot":
					setMode("crash-" + point)
					createRunning(t, d.Client, name)
				case "standby after restore":
					createStandby(t, d.Client, name)
					setMode("crash-" + point)
					action(t, d.Client, name, "restore")
				}
				setMode("ok")
				var err error
				if op == "live snapshot" {
					_, err = d.Client.CreateSnapshot(ctx(), name, api.SnapshotRequest{Name: name + "-snap"})
				} else {
					_, err = d.Client.Action(ctx(), name, "standby", api.ActionRequest{})
				}
				if err == nil {
					t.Fatalf("%s with the VMM dying mid-%s succeeded", op, point)
				}
				addFigure("faults_injected", 1)
				in, gerr := d.Client.GetInstance(ctx(), name)
				if gerr != nil {
					t.Fatal(gerr)
				}
				// Its memory died with the VMM: Stopped, as any instance whose
				// VMM is found dead (never Standby on a torn snapshot).
				if in.State != api.StateStopped || in.Error == "" {
					t.Errorf("after the VMM died mid-%s in %s: %s, error %q; want Stopped with the reason", point, op, in.State, in.Error)
				}
				g, _ := d.Layout.Guest(in.ID)
				for _, dir := range []string{g.Latest().Dir, g.Base().Dir} {
					if _, serr := os.Stat(dir); serr == nil {
						t.Errorf("%s is left after the VMM died mid-%s: a later restore could load it", dir, point)
					}
				}
				if snaps, _ := d.Client.ListSnapshots(ctx()); len(snaps) != 0 {
					t.Errorf("a snapshot record survived the failed live snapshot: %+v", snaps)
				}
				checkAll(t, d)
				if in := action(t, d.Client, name, "start"); in.State != api.StateRunning {
					t.Errorf("start after the failure: %s", in.State)
				}
				if err := d.Client.DeleteInstance(ctx(), name); err != nil {
					t.Fatal(err)
				}
			})
		}
	}
}

// needUffd stops t unless this machine has userfaultfd (a skip with the
// reason, or a failure under FORKD_TEST_REQUIRE=uffd).
func needUffd(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/userfaultfd"); err != nil {
		testenv.Need(t, testenv.Uffd, "no /dev/userfaultfd: "+err.Error())
	}
}

// uffdRestore restores ref through the pager. A pager that cannot start
// (503) is a failure like any other: the pager is part of the product.
func uffdRestore(t *testing.T, c *api.Client, ref string) api.Instance {
	t.Helper()
	needUffd(t)
	in, err := c.Action(ctxT(t, 60*time.Second), ref, "restore", api.ActionRequest{RestoreBackend: api.BackendUffd})
	if err != nil {
		t.Fatalf("uffd restore of %s: %v", ref, err)
	}
	return in
}

// TestPagerKilledUnderAUffdVM SIGKILLs the pager while a Uffd-restored VM
// runs. The daemon must stay responsive; the VM's instance can still be
// inspected and deleted; File restores are unaffected; and new Uffd
// restores work again (the daemon starts a new pager).
func TestPagerKilledUnderAUffdVM(t *testing.T) {
	t.Parallel()
	needUffd(t)
	d := newDaemon(t, nil)
	createStandby(t, d.Client, "victim")
	createStandby(t, d.Client, "other")
	createStandby(t, d.Client, "later")
	uffdRestore(t, d.Client, "victim")
	waitGuestWork(t, d, "victim", 30) // the guest faults pages in through the pager
	if in, err := d.Client.GetInstance(ctxT(t, 10*time.Second), "victim"); err != nil || in.MemoryCheck != "ok" {
		t.Fatalf("Uffd-restored VM before any fault: %+v %v; want memory_check ok", in, err)
	}
	pagers := 0
	for _, p := range ProcessesUnder(d.Layout.Root()) {
		if p.Kind == "pager" {
			pagers++
			if err := syscall.Kill(p.Pid, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}
	}
	if pagers == 0 {
		t.Fatal("a Uffd restore succeeded but no pager process runs under the data dir")
	}
	addFigure("faults_injected", 1)

	// Responsive: each call returns (with whatever it knows) within its
	// deadline instead of hanging on the stuck VM.
	if _, err := d.Client.Health(ctxT(t, 10*time.Second)); err != nil {
		t.Fatalf("daemon unresponsive after the pager died: %v", err)
	}
	// The pager's exit is an event the VM's supervisor sees.
	in := waitState(t, d.Client, "victim", api.StateError)
	t.Logf("after the pager died the Uffd VM is %s, memory_check %q, error %q", in.State, in.MemoryCheck, in.Error)
	if in.Error == "" {
		t.Errorf("the Uffd VM whose pager died is in Error without the reason")
	}
	if in, err := d.Client.Action(ctxT(t, 30*time.Second), "other", "restore", api.ActionRequest{RestoreBackend: api.BackendFile}); err != nil || in.State != api.StateRunning {
		t.Errorf("File restore after the pager died: %v", err)
	}
	var lastErr error
	for try := 0; try < 2; try++ {
		var in api.Instance
		in, lastErr = d.Client.Action(ctxT(t, 60*time.Second), "later", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd})
		if lastErr == nil && in.State == api.StateRunning {
			break
		}
	}
	if lastErr != nil {
		t.Errorf("Uffd restore after the pager died (two tries): %v", lastErr)
	}
	if err := d.Client.DeleteInstance(ctxT(t, 30*time.Second), "victim"); err != nil {
		t.Errorf("delete of the VM whose pager died: %v", err)
	}
	checkAll(t, d)
}

// TestPagerRestartDoesNotHideADeadSession kills the pager under a Uffd VM
// while the daemon is down (no exit event for anyone to see), restarts the
// daemon and restores another VM through the pager, which starts a new one
// of the same version. The new pager is healthy but never had the first
// VM's session: that VM is still frozen and must be reported Error, not
// Running (an action on it would otherwise hang on its frozen guest).
func TestPagerRestartDoesNotHideADeadSession(t *testing.T) {
	t.Parallel()
	needUffd(t)
	d := newDaemon(t, nil)
	createStandby(t, d.Client, "victim")
	createStandby(t, d.Client, "next")
	uffdRestore(t, d.Client, "victim")
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	for _, p := range ProcessesUnder(d.Layout.Root()) {
		if p.Kind == "pager" {
			syscall.Kill(p.Pid, syscall.SIGKILL)
			for deadline := time.Now().Add(30 * time.Second); syscall.Kill(p.Pid, 0) == nil && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			}
		}
	}
	addFigure("faults_injected", 1)
	d = restart(t, d, nil)
	// Restore another VM through the pager: this starts the new pager.
	var err error
	for try := 0; try < 2; try++ {
		if _, err = d.Client.Action(ctxT(t, 60*time.Second), "next", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd}); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("Uffd restore with a new pager: %v", err)
	}
	if in := waitState(t, d.Client, "victim", api.StateError); in.Error == "" {
		t.Errorf("the VM whose pager died is in Error without the reason")
	}
	if _, err := d.Client.Action(ctxT(t, 30*time.Second), "victim", "stop", api.ActionRequest{}); err != nil {
		t.Errorf("stop of the frozen VM: %v", err)
	}
	checkAll(t, d)
}
