package instance

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/testenv"
)

func TestMain(m *testing.M) {
	if os.Getenv(crashDirEnv) != "" {
		// A crash-test helper process (crash_test.go): it is SIGKILLed, so
		// it must make nothing it would have to clean up.
		os.Exit(crashHelper())
	}
	os.Exit(testenv.Main(m))
}

// forkdBinary is the forkd binary (built once per test process, or
// $FORKD_TEST_BINARY) whose `forkd vmm` emulator the tests run as a real VMM
// process. A build that fails fails the test.
func forkdBinary(tb testing.TB) string {
	tb.Helper()
	return testenv.ForkdBinary(tb)
}

// needUffd stops t unless this machine has userfaultfd (a skip with the
// reason, or a failure under FORKD_TEST_REQUIRE=uffd).
func needUffd(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/userfaultfd"); err != nil {
		testenv.Need(t, testenv.Uffd, "no /dev/userfaultfd: "+err.Error())
	}
}

// waitUntil polls cond until it holds, failing t after a minute.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after a minute waiting for %s", what)
		}
	}
}

// waitState waits until instance ref is in state (a supervisor applies what
// it learns asynchronously), failing t after a minute, and returns it.
func waitState(t *testing.T, m *Manager, ref, state string) api.Instance {
	t.Helper()
	var in api.Instance
	waitUntil(t, "instance "+ref+" to be "+state, func() bool {
		var err error
		in, err = m.GetInstance(context.Background(), ref)
		if err != nil {
			t.Fatalf("get %s: %v", ref, err)
		}
		return in.State == state
	})
	return in
}

// testBootArgs keep the guest workload small and modest for 2 shared cores.
const testBootArgs = "forkd.ws_mib=4 forkd.rate=400 forkd.write_pct=30"

const testMemMiB = 32

type testOpt func(*Config)

// newTestManager returns a manager on a short temp data dir (unix socket
// paths must stay under 108 bytes) driving real `forkd vmm` processes. Its
// cleanup deletes every instance (killing their VMMs) and closes it.
func newTestManager(t *testing.T, opts ...testOpt) *Manager {
	t.Helper()
	dir, err := os.MkdirTemp("", "fk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return newManagerAt(t, dir, opts...)
}

func newManagerAt(t *testing.T, dir string, opts ...testOpt) *Manager {
	t.Helper()
	cfg := Config{
		DataDir:     dir,
		VMM:         VMMSpec{Binary: forkdBinary(t), Args: testenv.EmulatorArgs(), Emulator: true},
		Jail:        testJail(t, dir),
		PagerBinary: forkdBinary(t),
		Logger:      slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})),
	}
	for _, o := range opts {
		o(&cfg)
	}
	m, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		list, _ := m.ListInstances(ctx)
		for _, in := range list {
			if err := m.DeleteInstance(ctx, in.ID); err != nil {
				t.Errorf("cleanup: delete %s: %v", in.Name, err)
			}
		}
		// Leave no pager behind: it exits once drained and sessionless.
		if hp, ok := m.startedPager().(interface{ Drain(context.Context) error }); ok {
			if err := hp.Drain(ctx); err != nil {
				t.Errorf("cleanup: drain pager: %v", err)
			}
		}
		m.Close()
	})
	return m
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func createRunning(t *testing.T, m *Manager, name string) api.Instance {
	t.Helper()
	in, err := m.CreateInstance(context.Background(), api.CreateInstanceRequest{
		Name: name, MemoryMiB: testMemMiB, BootArgs: testBootArgs,
	})
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	if in.State != api.StateRunning {
		t.Fatalf("create %s: state %s, want Running", name, in.State)
	}
	return in
}

func action(t testing.TB, m *Manager, ref, act string) api.Instance {
	t.Helper()
	in, err := m.Action(context.Background(), ref, act, api.ActionRequest{})
	if err != nil {
		t.Fatalf("%s %s: %v", act, ref, err)
	}
	return in
}

func fork(t *testing.T, m *Manager, ref string, req api.ForkRequest) api.Instance {
	t.Helper()
	in, err := m.ForkInstance(context.Background(), ref, req)
	if err != nil {
		t.Fatalf("fork %s as %s: %v", ref, req.Name, err)
	}
	return in
}

// verifyGuest lets the guest workload run until it has verified a fresh
// batch of pages and fails the test on any integrity error.
func verifyGuest(t *testing.T, m *Manager, id string) {
	t.Helper()
	g, err := m.layout.Guest(id)
	if err != nil {
		t.Fatal(err)
	}
	c := firecracker.NewClient(g.VMMSock())
	defer c.Close()
	ctx := context.Background()
	first, err := c.Guest(ctx)
	if err != nil {
		t.Fatalf("guest status of %s: %v", id, err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		gs, err := c.Guest(ctx)
		if err != nil {
			t.Fatalf("guest status of %s: %v", id, err)
		}
		if gs.IntegrityErrors > 0 {
			t.Fatalf("instance %s: %d memory integrity errors, first: %s", id, gs.IntegrityErrors, gs.FirstIntegrityError)
		}
		if gs.PagesVerified >= first.PagesVerified+100 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("instance %s: workload verified only %d pages in 20 s", id, gs.PagesVerified-first.PagesVerified)
		}
		time.Sleep(50 * time.Millisecond)
	}
	in, err := m.GetInstance(ctx, id)
	if err != nil || in.MemoryCheck != "ok" {
		t.Fatalf("instance %s: memory_check %q (%v), want ok", id, in.MemoryCheck, err)
	}
}

type fileID struct {
	ino   uint64
	nlink uint64
	sum   string
}

// fingerprint is a mem-file's inode, link count and sha256.
func fingerprint(t *testing.T, path string) fileID {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	sys := st.Sys().(*syscall.Stat_t)
	return fileID{ino: sys.Ino, nlink: uint64(sys.Nlink), sum: hex.EncodeToString(h.Sum(nil))}
}

func latestMem(t *testing.T, m *Manager, id string) string {
	t.Helper()
	g, err := m.layout.Guest(id)
	if err != nil {
		t.Fatal(err)
	}
	return g.Latest().Memory()
}

func baseMem(t *testing.T, m *Manager, id string) string {
	t.Helper()
	g, err := m.layout.Guest(id)
	if err != nil {
		t.Fatal(err)
	}
	return g.Base().Memory()
}

// cgroupCleanups holds the data dirs whose jail cgroups a cleanup already
// removes (testJail).
var cgroupCleanups sync.Map

// testJail is the jail every test manager runs its VMMs in, as a daemon
// does by default (vmm_jailer auto: forkd jailer for the emulator), with a
// uid range of the data dir's own (testenv.JailUIDRange). unjailed() runs
// VMMs as vmm_jailer none does.
func testJail(tb testing.TB, dir string) JailConfig {
	tb.Helper()
	testenv.NeedJail(tb, jail.HostCgroups)
	// Registered with the first manager of the data dir, so it runs after
	// every later cleanup of the test (the managers', any VMM kill): the
	// VMMs are gone by then.
	if _, seen := cgroupCleanups.LoadOrStore(dir, true); !seen {
		tb.Cleanup(func() {
			l, err := guestdir.New(dir)
			if err == nil {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				err = RemoveJailCgroups(ctx, l)
			}
			if err != nil {
				tb.Errorf("cleanup: the test's VMM cgroups: %v", err)
			}
		})
	}
	r, err := jail.ParseUIDRange(testenv.JailUIDRange(dir))
	if err != nil {
		tb.Fatal(err)
	}
	return JailConfig{Jailer: []string{forkdBinary(tb), "jailer"}, UIDs: r, MemoryOverhead: 256 << 20}
}

// unjailed runs a test manager's VMMs unjailed (vmm_jailer none).
func unjailed(c *Config) { c.Jail = JailConfig{} }
