package instance

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/emulator"
	"github.com/forkd/forkd/internal/firecracker"
)

// vmstateLeaks lists what a vmstate names outside dir, the directory of the
// VM that will load it: any absolute path (a copied snapshot would carry
// it to every fork), any relative path climbing out of dir, and any
// mention at all of the other directories given (its source's). It fails
// the test if the vmstate names no drive or no vsock socket, so the check
// is never vacuous.
func vmstateLeaks(t *testing.T, vmstate, dir string, others ...string) []string {
	t.Helper()
	d, err := emulator.ReadDevices(vmstate)
	if err != nil {
		t.Fatalf("read %s: %v", vmstate, err)
	}
	if len(d.Drives) == 0 || d.Vsock == "" {
		t.Fatalf("%s names no drive or no vsock (%+v): nothing to check", vmstate, d)
	}
	var leaks []string
	for _, p := range append(append([]string{}, d.Drives...), d.Vsock) {
		switch {
		case filepath.IsAbs(p):
			leaks = append(leaks, "absolute path "+p)
		case !strings.HasPrefix(filepath.Join(dir, p), dir+string(filepath.Separator)):
			leaks = append(leaks, "path "+p+" leaves "+dir)
		}
	}
	raw, err := os.ReadFile(vmstate)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range others {
		if bytes.Contains(raw, []byte(o)) {
			leaks = append(leaks, "names "+o)
		}
	}
	return leaks
}

// No path leaks into a fork: the vmstate of every kind of fork (of a
// Standby VM, of a store snapshot, of a running VM) and the one the fork's
// own VMM writes later name the fork's own disk and vsock socket, relative
// to its dir, and nothing under its source's directory. So a fork never
// opens its source's rootfs or binds its source's socket, even with the
// source gone.
func TestNoPathOfTheSourceLeaksIntoAFork(t *testing.T) {
	m := newTestManager(t)
	ctx := context.Background()
	src := createRunning(t, m, "src")
	srcG, _ := m.layout.Guest(src.ID)
	check := func(name string) {
		t.Helper()
		in, err := m.GetInstance(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		g, _ := m.layout.Guest(in.ID)
		for _, d := range []string{g.Latest().Dir, g.Base().Dir} {
			vs := filepath.Join(d, "vmstate")
			if _, err := os.Stat(vs); err != nil {
				continue
			}
			if leaks := vmstateLeaks(t, vs, g.Dir, srcG.Dir, srcG.Rootfs()); len(leaks) > 0 {
				t.Errorf("%s's %s names what is not its own: %v", name, vs, leaks)
			}
		}
	}
	action(t, m, "src", "standby")
	fork(t, m, "src", api.ForkRequest{Name: "of-standby"})
	check("of-standby")
	if _, err := m.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "snap"}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.ForkSnapshot(ctx, "snap", api.ForkRequest{Name: "of-snapshot"}); err != nil {
		t.Fatal(err)
	}
	check("of-snapshot")
	action(t, m, "src", "restore")
	fork(t, m, "src", api.ForkRequest{Name: "live", FromRunning: true})
	check("live")
	// The fork's own VMM writes its next vmstate: still its own paths.
	action(t, m, "of-standby", "restore")
	action(t, m, "of-standby", "standby")
	check("of-standby")
	// With the source gone, every fork still restores.
	if err := m.DeleteInstance(ctx, "src"); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"of-standby", "of-snapshot", "live"} {
		if in, _ := m.GetInstance(ctx, f); in.State == api.StateRunning {
			action(t, m, f, "standby")
			check(f)
		}
		if in := action(t, m, f, "restore"); in.State != api.StateRunning {
			t.Fatalf("%s after its source was deleted: %s", f, in.State)
		}
		verifyGuest(t, m, mustID(t, m, f))
	}
}

func mustID(t *testing.T, m *Manager, ref string) string {
	t.Helper()
	in, err := m.GetInstance(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	return in.ID
}

// The twin: a VM configured with absolute paths (as a driver passing host
// paths would) writes a vmstate the check rejects, for the disk and the
// vsock socket alike; copied into a fork it would open its source's rootfs.
func TestPathLeakCheckCatchesAbsoluteDevicePaths(t *testing.T) {
	src := t.TempDir()
	rootfs := filepath.Join(src, "rootfs.ext4")
	kernel := filepath.Join(src, "vmlinux")
	for _, f := range []string{rootfs, kernel} {
		if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p, err := firecracker.Launch(ctx, firecracker.LaunchSpec{Binary: forkdBinary(t), Args: []string{"vmm"},
		APISock: filepath.Join(src, "api.sock"), WorkDir: src, LogPath: filepath.Join(src, "vmm.log")})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill(context.Background())
	c := p.Client()
	defer c.Close()
	for i, step := range []func() error{
		func() error { return c.PutMachineConfig(ctx, firecracker.MachineConfig{VcpuCount: 1, MemSizeMib: 16}) },
		func() error {
			return c.PutBootSource(ctx, firecracker.BootSource{KernelImagePath: kernel, BootArgs: "forkd.ws_mib=2"})
		},
		func() error {
			return c.PutDrive(ctx, firecracker.Drive{DriveID: "rootfs", PathOnHost: rootfs, IsRootDevice: true})
		},
		func() error {
			return c.PutVsock(ctx, firecracker.Vsock{GuestCID: 3, UDSPath: filepath.Join(src, "v.sock")})
		},
		func() error { return c.StartInstance(ctx) },
		func() error { return c.Pause(ctx) },
		func() error {
			return c.CreateSnapshot(ctx, firecracker.SnapshotCreate{SnapshotPath: filepath.Join(src, "vmstate"), MemFilePath: filepath.Join(src, "mem")})
		},
	} {
		if err := step(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	forkDir := t.TempDir()
	leaks := vmstateLeaks(t, filepath.Join(src, "vmstate"), forkDir, src)
	want := []string{"absolute path " + rootfs, "absolute path " + filepath.Join(src, "v.sock"), "names " + src}
	if fmt.Sprint(leaks) != fmt.Sprint(want) {
		t.Fatalf("leaks %q, want %q", leaks, want)
	}
}
