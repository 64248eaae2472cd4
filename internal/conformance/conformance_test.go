package conformance

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/emulator"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/instance"
	"github.com/forkd/forkd/internal/reliability"
	"github.com/forkd/forkd/internal/testenv"
)

// Environment of the suite (see the package doc).
const (
	envVMM         = "FORKD_CONFORMANCE_VMM"         // "" (both) | "emulator" | "firecracker"
	envVersions    = "FORKD_CONFORMANCE_VERSIONS"    // emulator releases: "all", or a comma list; default oldest and newest
	envFirecracker = "FORKD_CONFORMANCE_FIRECRACKER" // the firecracker binary (default: in PATH)
	envKernel      = "FORKD_CONFORMANCE_KERNEL"      // guest kernel for real Firecracker
	envRootfs      = "FORKD_CONFORMANCE_ROOTFS"      // guest rootfs for real Firecracker
)

func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

// target is one VMM the scenarios run against.
type target struct {
	name     string
	args     []string // extra `forkd serve` flags
	emulator bool     // forkd vmm: memory is checked through GET /guest
	real     bool     // real Firecracker: resolved (or skipped) inside its own subtest
	kernel   string   // create's kernel and rootfs ("" on the emulator)
	rootfs   string
	version  string // the release the VMMs must report (emulator), "" to take what runs
}

// targets are the VMMs this run is configured for: by default the
// emulator at the oldest and newest release and real Firecracker, which
// skips with the reason where the host lacks it (and fails under
// FORKD_TEST_REQUIRE=kvm), so a KVM host runs it without being asked.
func targets(t *testing.T) []target {
	t.Helper()
	vmm := os.Getenv(envVMM)
	var out []target
	switch vmm {
	case "", "emulator", "firecracker":
	default:
		t.Fatalf("%s=%q: want emulator, firecracker or nothing (both)", envVMM, vmm)
	}
	if vmm != "firecracker" {
		all := emulator.SupportedVersions()
		versions := []string{all[0], all[len(all)-1]}
		switch v := os.Getenv(envVersions); v {
		case "":
		case "all":
			versions = all
		default:
			versions = strings.Split(v, ",")
		}
		for _, v := range versions {
			v = strings.TrimSpace(v)
			if err := emulator.ParseFirecrackerVersion(v); err != nil {
				t.Fatalf("%s: %v", envVersions, err)
			}
			out = append(out, target{name: "emulator-" + v, emulator: true, version: v,
				args: []string{"--vmm-binary", "emulator", "--emulator-firecracker-version", v}})
		}
	}
	if vmm != "emulator" {
		out = append(out, target{name: "firecracker", real: true})
	}
	return out
}

// resolve returns tg ready to run; for real Firecracker it finds the
// binaries, kernel and rootfs, and stops the (sub)test when any is
// missing: a skip naming every missing piece, or a failure under
// FORKD_TEST_REQUIRE=kvm.
func (tg target) resolve(t *testing.T) target {
	t.Helper()
	if !tg.real {
		return tg
	}
	var missing []string
	if _, err := os.Stat("/dev/kvm"); err != nil {
		missing = append(missing, "no /dev/kvm ("+err.Error()+")")
	}
	bin := os.Getenv(envFirecracker)
	if bin == "" {
		if p, err := exec.LookPath("firecracker"); err == nil {
			bin = p
		} else {
			missing = append(missing, "no firecracker in PATH (or set "+envFirecracker+")")
		}
	}
	if bin != "" {
		if fi, err := os.Stat(bin); err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
			missing = append(missing, envFirecracker+"="+bin+" is not an executable file")
		} else if _, err := os.Stat(filepath.Join(filepath.Dir(bin), "jailer")); err != nil {
			if _, err := exec.LookPath("jailer"); err != nil {
				missing = append(missing, "no jailer beside "+bin+" or in PATH")
			}
		}
	}
	tg.kernel, tg.rootfs = os.Getenv(envKernel), os.Getenv(envRootfs)
	for _, e := range []struct{ env, path string }{{envKernel, tg.kernel}, {envRootfs, tg.rootfs}} {
		if e.path == "" {
			missing = append(missing, e.env+" is not set (a guest kernel and rootfs are needed)")
		} else if _, err := os.Stat(e.path); err != nil {
			missing = append(missing, e.env+": "+err.Error())
		}
	}
	if len(missing) > 0 {
		testenv.Need(t, testenv.KVM, "real Firecracker: "+strings.Join(missing, "; "))
	}
	tg.args = []string{"--vmm-binary", bin}
	return tg
}

// run starts a daemon for tg per scenario and runs each scenario in it.
func run(t *testing.T, scenario func(t *testing.T, s *suite)) {
	for _, tg := range targets(t) {
		t.Run(tg.name, func(t *testing.T) {
			s := &suite{t: t, tg: tg.resolve(t)}
			s.d = s.start(nil)
			scenario(t, s)
			s.check()
		})
	}
}

// suite is one scenario's daemon against one target.
type suite struct {
	t  *testing.T
	tg target
	d  *reliability.Daemon
}

func (s *suite) start(env []string) *reliability.Daemon {
	t := s.t
	t.Helper()
	dir, err := os.MkdirTemp("", "fkc")
	if err != nil {
		t.Fatal(err)
	}
	d, err := reliability.StartDaemon(context.Background(), reliability.DaemonOptions{
		Binary: testenv.ForkdBinary(t), DataDir: filepath.Join(dir, "d"), Args: s.tg.args, Env: env,
		LogPath: filepath.Join(dir, "daemon.log"),
	})
	if err != nil {
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(d.LogTail())
		}
		if err := d.Shutdown(context.Background()); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		os.RemoveAll(dir)
	})
	return d
}

func (s *suite) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	s.t.Cleanup(cancel)
	return ctx
}

func (s *suite) create(name string) api.Instance {
	s.t.Helper()
	in, err := s.d.Client.CreateInstance(s.ctx(), api.CreateInstanceRequest{Name: name, MemoryMiB: 64,
		Kernel: s.tg.kernel, Rootfs: s.tg.rootfs, BootArgs: s.bootArgs()})
	if err != nil {
		s.t.Fatalf("create %s: %v", name, err)
	}
	s.running(in)
	return in
}

func (s *suite) bootArgs() string {
	if s.tg.emulator {
		return "forkd.ws_mib=8 forkd.rate=1000 forkd.write_pct=30"
	}
	return "console=ttyS0 reboot=k panic=1"
}

func (s *suite) act(ref, action string, req api.ActionRequest) api.Instance {
	s.t.Helper()
	in, err := s.d.Client.Action(s.ctx(), ref, action, req)
	if err != nil {
		s.t.Fatalf("%s %s: %v", action, ref, err)
	}
	return in
}

func (s *suite) fork(ref string, req api.ForkRequest) api.Instance {
	s.t.Helper()
	in, err := s.d.Client.ForkInstance(s.ctx(), ref, req)
	if err != nil {
		s.t.Fatalf("fork %s as %s: %v", ref, req.Name, err)
	}
	return in
}

// running checks a Running instance: its VMM is the release the target
// says, and (emulator) its guest verifies a fresh batch of pages with no
// integrity error.
func (s *suite) running(in api.Instance) {
	s.t.Helper()
	if in.State != api.StateRunning {
		s.t.Fatalf("%s is %s (error %q), want Running", in.Name, in.State, in.Error)
	}
	g, err := s.d.Layout.Guest(in.ID)
	if err != nil {
		s.t.Fatal(err)
	}
	c := firecracker.NewClient(g.VMMSock())
	defer c.Close()
	v, err := c.Version(s.ctx())
	if err != nil {
		s.t.Fatalf("%s: GET /version: %v", in.Name, err)
	}
	if s.tg.version != "" && !strings.HasPrefix(v.String(), s.tg.version+".") {
		s.t.Fatalf("%s runs Firecracker %s, want %s", in.Name, v, s.tg.version)
	}
	if !s.tg.emulator {
		return // real Firecracker: no GET /guest (memory_check is unknown)
	}
	first, err := c.Guest(s.ctx())
	if err != nil {
		s.t.Fatalf("%s: guest: %v", in.Name, err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		gs, err := c.Guest(s.ctx())
		if err != nil {
			s.t.Fatalf("%s: guest: %v", in.Name, err)
		}
		if gs.IntegrityErrors > 0 {
			s.t.Fatalf("%s: %d memory integrity errors, first: %s", in.Name, gs.IntegrityErrors, gs.FirstIntegrityError)
		}
		if gs.PagesVerified >= first.PagesVerified+100 {
			break
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("%s: the guest verified %d pages in 60 s", in.Name, gs.PagesVerified-first.PagesVerified)
		}
		time.Sleep(50 * time.Millisecond)
	}
	got, err := s.d.Client.GetInstance(s.ctx(), in.ID)
	if err != nil || got.MemoryCheck != "ok" {
		s.t.Fatalf("%s: memory_check %q (%v), want ok", in.Name, got.MemoryCheck, err)
	}
}

// check waits for the daemon to settle and checks every invariant the
// crash suite checks.
func (s *suite) check() {
	s.t.Helper()
	ctx := s.ctx()
	if err := reliability.WaitSettled(ctx, s.d.Client, time.Minute); err != nil {
		s.t.Errorf("settle: %v", err)
	}
	if err := reliability.CheckInvariants(ctx, s.d); err != nil {
		s.t.Errorf("invariants:\n%v", err)
	}
}

func TestLifecycle(t *testing.T) {
	run(t, func(t *testing.T, s *suite) {
		in := s.create("vm")
		if in.Vsock == nil {
			t.Errorf("no vsock on a new VM")
		}
		s.act("vm", "pause", api.ActionRequest{})
		s.running(s.act("vm", "resume", api.ActionRequest{}))
		if in := s.act("vm", "stop", api.ActionRequest{}); in.State != api.StateStopped {
			t.Fatalf("stop: %s", in.State)
		}
		s.running(s.act("vm", "start", api.ActionRequest{}))
	})
}

func TestStandbyAndRestore(t *testing.T) {
	run(t, func(t *testing.T, s *suite) {
		s.create("vm")
		for i := 0; i < 2; i++ { // Full, then a Diff into the restored base
			if in := s.act("vm", "standby", api.ActionRequest{}); in.State != api.StateStandby {
				t.Fatalf("standby %d: %s", i, in.State)
			}
			s.running(s.act("vm", "restore", api.ActionRequest{RestoreBackend: api.BackendFile}))
		}
	})
}

func TestUffdRestore(t *testing.T) {
	if _, err := os.Stat("/dev/userfaultfd"); err != nil {
		testenv.Need(t, testenv.Uffd, "no /dev/userfaultfd: "+err.Error())
	}
	run(t, func(t *testing.T, s *suite) {
		s.create("vm")
		s.act("vm", "standby", api.ActionRequest{})
		s.running(s.act("vm", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd}))
		s.act("vm", "standby", api.ActionRequest{})
		s.running(s.act("vm", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd}))
		s.act("vm", "standby", api.ActionRequest{})
		for i := 0; i < 2; i++ { // siblings share the pager's cache
			s.running(s.fork("vm", api.ForkRequest{Name: fmt.Sprintf("f%d", i), TargetState: api.StateRunning, RestoreBackend: api.BackendUffd}))
		}
	})
}

func TestFork(t *testing.T) {
	run(t, func(t *testing.T, s *suite) {
		s.create("src")
		s.act("src", "standby", api.ActionRequest{})
		var socks []string
		for i := 0; i < 2; i++ {
			f := s.fork("src", api.ForkRequest{Name: fmt.Sprintf("f%d", i), TargetState: api.StateRunning})
			s.running(f)
			if f.Vsock == nil || slices.Contains(socks, f.Vsock.UDSPath) {
				t.Fatalf("fork %s: vsock %+v is missing or another fork's", f.Name, f.Vsock)
			}
			socks = append(socks, f.Vsock.UDSPath)
		}
		s.running(s.act("src", "restore", api.ActionRequest{}))
		s.running(s.fork("src", api.ForkRequest{Name: "live", FromRunning: true, TargetState: api.StateRunning}))
		s.act("f0", "stop", api.ActionRequest{})
		if d := s.fork("f0", api.ForkRequest{Name: "disk"}); d.State != api.StateStopped {
			t.Fatalf("a fork of a Stopped VM is %s, want Stopped", d.State)
		}
		if err := s.d.Client.DeleteInstance(s.ctx(), "src"); err != nil {
			t.Fatal(err)
		}
		s.act("f1", "standby", api.ActionRequest{})
		s.running(s.act("f1", "restore", api.ActionRequest{}))
	})
}

func TestSnapshots(t *testing.T) {
	run(t, func(t *testing.T, s *suite) {
		s.create("src")
		ctx := s.ctx()
		// Of a running VM (its base brought up to date in place), then of a
		// Standby one, then compressed.
		if _, err := s.d.Client.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "live"}); err != nil {
			t.Fatalf("snapshot of a running VM: %v", err)
		}
		s.act("src", "standby", api.ActionRequest{})
		if _, err := s.d.Client.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "parked"}); err != nil {
			t.Fatalf("snapshot of a Standby VM: %v", err)
		}
		if _, err := s.d.Client.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "packed", Compression: "zstd"}); err != nil {
			t.Fatalf("compressed snapshot: %v", err)
		}
		deadline := time.Now().Add(2 * time.Minute)
		for {
			sn, err := s.d.Client.GetSnapshot(ctx, "packed")
			if err != nil {
				t.Fatal(err)
			}
			if sn.State == "compressed" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("snapshot packed still %s after 2 min", sn.State)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err := s.d.Client.DeleteInstance(ctx, "src"); err != nil {
			t.Fatal(err)
		}
		for _, sn := range []string{"live", "parked", "packed"} {
			f, err := s.d.Client.ForkSnapshot(ctx, sn, api.ForkRequest{Name: "of-" + sn, TargetState: api.StateRunning})
			if err != nil {
				t.Fatalf("fork of snapshot %s: %v", sn, err)
			}
			s.running(f)
			if err := s.d.Client.DeleteSnapshot(ctx, sn); err != nil {
				t.Fatal(err)
			}
		}
		// Forks outlive their snapshot, and park and wake on their own.
		s.act("of-live", "standby", api.ActionRequest{})
		s.running(s.act("of-live", "restore", api.ActionRequest{}))
	})
}

// crashCases are journal steps the daemon is killed at
// (instance.CrashAtEnv) in the middle of an action.
var crashCases = []struct{ at, action string }{
	{"standby:creating", "standby"},
	{"standby:created", "standby"},
	{"restore:launched", "restore"},
	{"fork:committed", "fork"},
}

// TestCrashRecovery kills the daemon in the middle of a standby, restore
// and fork: the restarted daemon settles, every invariant holds, and the
// VM runs on (restored, or started afresh where its memory was lost).
func TestCrashRecovery(t *testing.T) {
	for _, tg := range targets(t) {
		t.Run(tg.name, func(t *testing.T) {
			tg := tg.resolve(t)
			for _, cc := range crashCases {
				t.Run(strings.ReplaceAll(cc.at, ":", "-"), func(t *testing.T) {
					s := &suite{t: t, tg: tg}
					s.d = s.start([]string{instance.CrashAtEnv + "=" + cc.at})
					s.create("vm")
					if cc.action != "standby" {
						s.act("vm", "standby", api.ActionRequest{})
					}
					var err error
					if cc.action == "fork" {
						_, err = s.d.Client.ForkInstance(s.ctx(), "vm", api.ForkRequest{Name: "f", TargetState: api.StateRunning})
					} else {
						_, err = s.d.Client.Action(s.ctx(), "vm", cc.action, api.ActionRequest{})
					}
					if err == nil {
						t.Fatalf("%s: the daemon did not crash at %s", cc.action, cc.at)
					}
					if _, err := s.d.WaitExit(30 * time.Second); err != nil {
						t.Fatalf("crash at %s: %v", cc.at, err)
					}
					nd, err := s.d.Restart(s.ctx(), nil)
					if err != nil {
						t.Fatalf("restart: %v", err)
					}
					t.Cleanup(func() {
						if err := nd.Shutdown(context.Background()); err != nil {
							t.Errorf("shutdown: %v", err)
						}
					})
					s.d = nd
					s.check()
					insts, err := s.d.Client.ListInstances(s.ctx())
					if err != nil {
						t.Fatal(err)
					}
					for _, in := range insts {
						switch in.State {
						case api.StateStandby:
							in = s.act(in.ID, "restore", api.ActionRequest{})
						case api.StateStopped:
							in = s.act(in.ID, "start", api.ActionRequest{})
						}
						s.running(in)
					}
					s.check()
				})
			}
		})
	}
}
