package reliability

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/testenv"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(fakeVMMEnv); mode != "" {
		os.Exit(fakeVMM(mode, os.Args[1:]))
	}
	code := testenv.Main(m)
	printFigures()
	os.Exit(code)
}

// forkdBinary is the forkd binary the daemons run (built once per test
// process, or $FORKD_TEST_BINARY); a build that fails fails the test.
func forkdBinary(tb testing.TB) string {
	tb.Helper()
	return testenv.ForkdBinary(tb)
}

// Guests are small and their workloads modest: 2 shared cores.
const (
	testMemMiB   = 32
	testBootArgs = "forkd.ws_mib=4 forkd.rate=400 forkd.write_pct=30"
)

// newDaemon starts a daemon on a fresh short data dir (VMM socket paths must
// fit 108 bytes). Cleanup shuts it down (deleting everything, killing any
// straggler process) and removes the dir; a failed test gets the daemon log.
func newDaemon(t *testing.T, env []string, args ...string) *Daemon {
	t.Helper()
	return newDaemonIn(t, "", env, args...)
}

// newDaemonIn is newDaemon with the data dir made under parent ("" for the
// system temp dir).
func newDaemonIn(t *testing.T, parent string, env []string, args ...string) *Daemon {
	t.Helper()
	return newDaemonSpec(t, parent, func(o *DaemonOptions) { o.Env, o.Args = env, args })
}

// newDaemonSpec is newDaemonIn with the options set by edit.
func newDaemonSpec(t *testing.T, parent string, edit func(*DaemonOptions)) *Daemon {
	t.Helper()
	bin := forkdBinary(t)
	dir, err := os.MkdirTemp(parent, "fkr")
	if err != nil {
		t.Fatal(err)
	}
	opts := DaemonOptions{Binary: bin, DataDir: filepath.Join(dir, "d"), LogPath: filepath.Join(dir, "daemon.log")}
	edit(&opts)
	opts.Env = withEmulatorVersion(opts.Env)
	// Jailed (vmm_jailer auto, the default), with uids of its own: daemons
	// of tests running side by side never share one.
	testenv.NeedJail(t, jail.HostCgroups)
	opts.Args = append([]string{"--jail-uid-range", testenv.JailUIDRange(opts.DataDir)}, opts.Args...)
	d, err := StartDaemon(context.Background(), opts)
	if err != nil {
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Cleanups run last-registered first: a restarted successor (see
		// restart) has already deleted everything and stopped by now; this
		// stops the original if it still runs, kills any straggler process
		// under the data dir, and removes it.
		if t.Failed() {
			t.Log(d.LogTail())
			// FORKD_RELIABILITY_KEEP_LOGS=DIR keeps failed tests' daemon logs.
			if keep := os.Getenv("FORKD_RELIABILITY_KEEP_LOGS"); keep != "" {
				if b, err := os.ReadFile(opts.LogPath); err == nil {
					name := strings.NewReplacer("/", "_", " ", "_").Replace(t.Name()) + ".log"
					os.WriteFile(filepath.Join(keep, name), b, 0o600)
				}
			}
		}
		// Shutdown also removes the data dir's jail cgroups: a cgroup
		// still holding a process (a leaked VMM) fails the test.
		if err := d.Shutdown(context.Background()); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		os.RemoveAll(dir)
	})
	return d
}

// restart starts d's successor on the same data dir (d must have exited);
// the successor is shut down when the test ends.
func restart(t *testing.T, d *Daemon, env []string) *Daemon {
	t.Helper()
	env = withEmulatorVersion(env)
	nd, err := d.Restart(context.Background(), env)
	// A child the killed daemon was forking (vfork, before its exec closes
	// inherited descriptors) can hold the data-dir lock for a moment after
	// the daemon died; a supervisor would simply retry, and so does this.
	for try := 0; err != nil && strings.Contains(err.Error(), "already running") && try < 10; try++ {
		t.Logf("restart: data dir still locked (holders %v); retrying", openers(filepath.Join(d.Layout.Root(), "forkd.lock")))
		time.Sleep(200 * time.Millisecond)
		nd, err = d.Restart(context.Background(), env)
	}
	if err != nil {
		t.Fatalf("restart: %v%s\nprocesses holding %s open: %v", err, d.LogTail(), "forkd.lock", openers(filepath.Join(d.Layout.Root(), "forkd.lock")))
	}
	t.Cleanup(func() {
		if err := nd.Shutdown(context.Background()); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return nd
}

// withEmulatorVersion adds the emulator release the test environment names
// (testenv.FirecrackerVersion) to a daemon's environment.
func withEmulatorVersion(env []string) []string {
	if v := testenv.FirecrackerVersion(); v != "" {
		return append(append([]string{}, env...), "FORKD_EMULATOR_FIRECRACKER_VERSION="+v)
	}
	return env
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func createRunning(t *testing.T, c *api.Client, name string) api.Instance {
	t.Helper()
	in, err := c.CreateInstance(ctxT(t, 30*time.Second), api.CreateInstanceRequest{Name: name, MemoryMiB: testMemMiB, BootArgs: testBootArgs})
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	if in.State != api.StateRunning {
		t.Fatalf("create %s: %s (error %q)", name, in.State, in.Error)
	}
	return in
}

func action(t *testing.T, c *api.Client, ref, act string) api.Instance {
	t.Helper()
	in, err := c.Action(ctxT(t, 30*time.Second), ref, act, api.ActionRequest{})
	if err != nil {
		t.Fatalf("%s %s: %v", act, ref, err)
	}
	return in
}

func createStandby(t *testing.T, c *api.Client, name string) api.Instance {
	t.Helper()
	createRunning(t, c, name)
	return action(t, c, name, "standby")
}

// waitState waits until instance ref is in state (the daemon's supervisor
// applies what it learns, such as a VMM's exit, on its own), failing t
// after a minute, and returns it.
func waitState(t *testing.T, c *api.Client, ref, state string) api.Instance {
	t.Helper()
	var in api.Instance
	var err error
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
		in, err = c.GetInstance(ctxT(t, 10*time.Second), ref)
		if err != nil {
			t.Fatalf("get %s (waiting for %s): %v", ref, state, err)
		}
		if in.State == state {
			return in
		}
		if time.Now().After(deadline) {
			t.Fatalf("instance %s is %s (error %q) after a minute, want %s", ref, in.State, in.Error, state)
		}
	}
}

// waitGuestWork waits until the guest of instance ref has written and
// verified at least pages more pages of its working set than when called
// (asked through its VMM's GET /guest): the guest has done the work a step
// of a test needs, whatever the machine's load. It fails t on an integrity
// error or after a minute.
func waitGuestWork(t *testing.T, d *Daemon, ref string, pages uint64) {
	t.Helper()
	in, err := d.Client.GetInstance(ctxT(t, 10*time.Second), ref)
	if err != nil {
		t.Fatal(err)
	}
	g, err := d.Layout.Guest(in.ID)
	if err != nil {
		t.Fatal(err)
	}
	c := firecracker.NewClient(g.VMMSock())
	defer c.Close()
	first, err := c.Guest(ctxT(t, 10*time.Second))
	if err != nil {
		t.Fatalf("guest of %s: %v", ref, err)
	}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(20 * time.Millisecond) {
		gs, err := c.Guest(ctxT(t, 10*time.Second))
		if err != nil {
			t.Fatalf("guest of %s: %v", ref, err)
		}
		if gs.IntegrityErrors > 0 {
			t.Fatalf("guest of %s: %d integrity errors, first: %s", ref, gs.IntegrityErrors, gs.FirstIntegrityError)
		}
		if gs.PagesWritten >= first.PagesWritten+pages && gs.PagesVerified >= first.PagesVerified+pages {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest of %s wrote %d and verified %d pages in a minute, want %d each", ref,
				gs.PagesWritten-first.PagesWritten, gs.PagesVerified-first.PagesVerified, pages)
		}
	}
}

// figures collects the numbers RELIABILITY.md quotes; TestMain prints them.
var figures = struct {
	sync.Mutex
	m map[string]int64
}{m: map[string]int64{}}

func addFigure(name string, n int64) {
	figures.Lock()
	figures.m[name] += n
	figures.Unlock()
}

func printFigures() {
	figures.Lock()
	defer figures.Unlock()
	if len(figures.m) == 0 {
		return
	}
	var b strings.Builder
	b.WriteString("reliability figures:")
	for _, k := range sortedKeys(figures.m) {
		fmt.Fprintf(&b, " %s=%d", k, figures.m[k])
	}
	fmt.Println(b.String())
}

func sortedKeys(m map[string]int64) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// checkAll runs CheckInvariants and fails the test on any violation.
func checkAll(t *testing.T, d *Daemon) {
	t.Helper()
	ctx := ctxT(t, 60*time.Second)
	if err := WaitSettled(ctx, d.Client, 30*time.Second); err != nil {
		t.Errorf("settle: %v", err)
	}
	if err := CheckInvariants(ctx, d); err != nil {
		t.Errorf("invariants violated:\n%v", err)
	}
	checkNetworks(t, d)
}

// openers lists the processes (pid and command line) with path open, to
// explain a data-dir lock that outlived its daemon.
func openers(path string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		fds, err := os.ReadDir(filepath.Join("/proc", e.Name(), "fd"))
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if target, err := os.Readlink(filepath.Join("/proc", e.Name(), "fd", fd.Name())); err == nil && target == path {
				cmd, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
				out = append(out, e.Name()+": "+strings.ReplaceAll(string(cmd), "\x00", " "))
				break
			}
		}
	}
	return out
}
