package firecracker

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/testenv"
)

// These tests drive the real emulator (`forkd vmm`) through Launch and the
// client: the driver's contract with a VMM, end to end.

// launchEmulator launches `forkd vmm` on a socket in dir, at the release the
// test environment names (testenv.FirecrackerVersion, else the newest),
// skipping the test while `forkd vmm` is still the skeleton's stub.
func launchEmulator(t *testing.T, dir, name string) (*Process, *Client) {
	t.Helper()
	return launchEmulatorArgs(t, dir, name, testenv.EmulatorArgs())
}

// launchEmulatorVersion is launchEmulator as Firecracker release version.
func launchEmulatorVersion(t *testing.T, dir, name, version string) (*Process, *Client) {
	t.Helper()
	return launchEmulatorArgs(t, dir, name, []string{"vmm", "--firecracker-version", version})
}

func launchEmulatorArgs(t *testing.T, dir, name string, args []string) (*Process, *Client) {
	t.Helper()
	bin, err := forkdBinary()
	if err != nil {
		t.Fatalf("build forkd: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	p, err := Launch(ctx, LaunchSpec{
		Binary:  bin,
		Args:    args,
		APISock: filepath.Join(dir, name+".sock"),
		ID:      name,
		LogPath: filepath.Join(dir, "logs", name+".log"),
		WorkDir: dir,
	})
	if err != nil {
		t.Fatalf("Launch forkd vmm: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Kill(ctx); err != nil {
			t.Errorf("cleanup Kill %s: %v", name, err)
		}
	})
	c := p.Client()
	t.Cleanup(c.Close)
	return p, c
}

// waitGuest polls GET /guest until ok accepts the status or 30 s pass.
func waitGuest(t *testing.T, c *Client, what string, ok func(GuestStatus) bool) GuestStatus {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		g, err := c.Guest(context.Background())
		if err != nil {
			t.Fatalf("Guest (waiting for %s): %v", what, err)
		}
		if ok(g) {
			return g
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest never reached %s; last status %+v", what, g)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func wantState(t *testing.T, c *Client, want string) {
	t.Helper()
	info, err := c.Describe(context.Background())
	if err != nil {
		t.Fatalf("Describe: %v", err)
	}
	if info.State != want {
		t.Fatalf("VMM state %q, want %q", info.State, want)
	}
}

// bootWorkload boots a 64 MiB guest whose workload touches 8 MiB, and waits
// until it has written and verified pages.
func bootWorkload(t *testing.T, dir string) (*Process, *Client) {
	t.Helper()
	ctx := context.Background()
	kernel := filepath.Join(dir, "vmlinux")
	if err := os.WriteFile(kernel, []byte("placeholder kernel\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	p, c := launchEmulator(t, dir, "source")
	wantState(t, c, StateNotStarted)
	steps := []struct {
		name string
		do   func() error
	}{
		{"machine-config", func() error {
			return c.PutMachineConfig(ctx, MachineConfig{VcpuCount: 1, MemSizeMib: 64, TrackDirtyPages: true})
		}},
		{"boot-source", func() error {
			return c.PutBootSource(ctx, BootSource{KernelImagePath: kernel, BootArgs: "forkd.ws_mib=8 forkd.write_pct=30 forkd.seed=7 forkd.rate=20000"})
		}},
		{"start", func() error { return c.StartInstance(ctx) }},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
	}
	wantState(t, c, StateRunning)
	waitGuest(t, c, "written and verified pages", func(g GuestStatus) bool { return g.PagesWritten > 0 && g.PagesVerified > 0 })
	return p, c
}

// snapshotAndKill pauses, snapshots (type typ) into dir/vmstate and
// dir/memory, and kills the VMM.
func snapshotAndKill(t *testing.T, p *Process, c *Client, dir, typ string) {
	t.Helper()
	ctx := context.Background()
	if err := c.Pause(ctx); err != nil {
		t.Fatalf("Pause: %v", err)
	}
	wantState(t, c, StatePaused)
	if err := c.CreateSnapshot(ctx, SnapshotCreate{SnapshotType: typ, SnapshotPath: filepath.Join(dir, "vmstate"), MemFilePath: filepath.Join(dir, "memory")}); err != nil {
		t.Fatalf("CreateSnapshot %s: %v", typ, err)
	}
	if err := p.Kill(ctx); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	if p.Alive() {
		t.Fatal("VMM alive after Kill")
	}
}

// restoreAndRun loads dir's snapshot (File backend) into a new VMM, resumes
// it, and lets the workload verify pages it did not write since the restore.
func restoreAndRun(t *testing.T, dir, name string) (*Process, *Client, GuestStatus) {
	t.Helper()
	ctx := context.Background()
	p, c := launchEmulator(t, dir, name)
	err := c.LoadSnapshot(ctx, SnapshotLoad{
		SnapshotPath:    filepath.Join(dir, "vmstate"),
		MemBackend:      MemBackend{BackendType: BackendFile, BackendPath: filepath.Join(dir, "memory")},
		TrackDirtyPages: true,
	})
	if err != nil {
		t.Fatalf("LoadSnapshot: %v", err)
	}
	wantState(t, c, StatePaused)
	before, err := c.Guest(ctx)
	if err != nil {
		t.Fatalf("Guest after load: %v", err)
	}
	if err := c.Resume(ctx); err != nil {
		t.Fatalf("Resume: %v", err)
	}
	wantState(t, c, StateRunning)
	// 8 MiB is 2048 pages: verifying well past that reads restored pages.
	g := waitGuest(t, c, "verified 4096 more pages", func(g GuestStatus) bool {
		return g.PagesVerified >= before.PagesVerified+4096 || g.IntegrityErrors > 0
	})
	return p, c, g
}

func TestEmulatorSurvivesFullThenDiffSnapshotRestore(t *testing.T) {
	dir := shortTempDir(t)
	p, c := bootWorkload(t, dir)
	// What a restarted daemon does: re-attach by pid and socket.
	if _, err := Adopt(p.Pid, p.APISock); err != nil {
		t.Fatalf("Adopt the running emulator: %v", err)
	}
	snapshotAndKill(t, p, c, dir, SnapshotFull)

	p2, c2, g := restoreAndRun(t, dir, "restored")
	if g.IntegrityErrors != 0 {
		t.Fatalf("after Full snapshot → kill → load → resume: %d integrity errors, first: %s", g.IntegrityErrors, g.FirstIntegrityError)
	}
	// The standby cycle the manager runs: a Diff merged in place into the
	// base this VM was restored from (exclusively ours here).
	snapshotAndKill(t, p2, c2, dir, SnapshotDiff)
	_, _, g = restoreAndRun(t, dir, "restored-diff")
	if g.IntegrityErrors != 0 {
		t.Fatalf("after Diff snapshot → kill → load → resume: %d integrity errors, first: %s", g.IntegrityErrors, g.FirstIntegrityError)
	}
}

// The twin: the same path with the mem-file corrupted must be caught, or the
// check above proves nothing.
func TestEmulatorReportsCorruptedMemFile(t *testing.T) {
	dir := shortTempDir(t)
	p, c := bootWorkload(t, dir)
	snapshotAndKill(t, p, c, dir, SnapshotFull)
	corruptEveryPage(t, filepath.Join(dir, "memory"))

	_, cr := launchEmulator(t, dir, "corrupt")
	ctx := context.Background()
	err := cr.LoadSnapshot(ctx, SnapshotLoad{
		SnapshotPath: filepath.Join(dir, "vmstate"),
		MemBackend:   MemBackend{BackendType: BackendFile, BackendPath: filepath.Join(dir, "memory")},
		ResumeVM:     true,
	})
	if err != nil {
		t.Logf("load of a corrupted mem-file refused: %v", err)
		return
	}
	g := waitGuest(t, cr, "an integrity error", func(g GuestStatus) bool { return g.IntegrityErrors > 0 })
	t.Logf("corruption caught: %d integrity errors, first: %s", g.IntegrityErrors, g.FirstIntegrityError)
}

// corruptEveryPage flips one byte in every 4 KiB page of path, in the
// middle of the page (away from any header at its start).
func corruptEveryPage(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	for off := int64(2048); off < st.Size(); off += 4096 {
		if _, err := f.ReadAt(b, off); err != nil {
			t.Fatal(fmt.Errorf("read %s@%d: %w", path, off, err))
		}
		b[0] ^= 0xff
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
}
