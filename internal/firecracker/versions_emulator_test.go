package firecracker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/testenv"
	"github.com/forkd/forkd/internal/testnet"
)

// driverScenario makes every request the driver has, the way the manager
// makes them, against emulators launched at release version inside a
// network namespace of the test's own (with TAPs tap0 and tap1), through
// the client each launch returned (which knows the version). It returns
// the first refusal. client, when set, replaces that client: the twin test
// uses it to send another release's fields.
func driverScenario(t *testing.T, version string, client func(*Process) *Client) error {
	t.Helper()
	ctx := context.Background()
	ns := testnet.New(t)
	ns.AddTAP(testnet.TAP{Name: "tap0"})
	ns.AddTAP(testnet.TAP{Name: "tap1"})
	dir := shortTempDir(t)
	kernel := filepath.Join(dir, "vmlinux")
	rootfs := filepath.Join(dir, "rootfs.ext4")
	for _, f := range []string{kernel, rootfs} {
		if err := os.WriteFile(f, []byte("placeholder\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	bin := testenv.ForkdBinary(t)
	launch := func(name string) (*Process, *Client) {
		var p *Process
		ns.Do(func() error {
			var err error
			p, err = Launch(ctx, LaunchSpec{Binary: bin, Args: []string{"vmm", "--firecracker-version", version},
				APISock: filepath.Join(dir, name+".sock"), ID: name, LogPath: filepath.Join(dir, "logs", name+".log"), WorkDir: dir})
			return err
		})
		t.Cleanup(func() { p.Kill(context.Background()) })
		c := p.Client()
		if client != nil {
			c = client(p)
		}
		t.Cleanup(c.Close)
		return p, c
	}
	steps := func(named ...namedStep) error {
		for _, s := range named {
			if err := s.do(); err != nil {
				return fmt.Errorf("%s: %w", s.name, err)
			}
		}
		return nil
	}
	snap := func(typ string) SnapshotCreate {
		return SnapshotCreate{SnapshotType: typ, SnapshotPath: filepath.Join(dir, "vmstate"), MemFilePath: filepath.Join(dir, "memory")}
	}

	// Boot with a disk and a network interface, Full then Diff snapshots
	// (the start → standby path).
	p1, c1 := launch("boot")
	nic := NetworkInterface{IfaceID: "eth0", HostDevName: "tap0", GuestMAC: "02:fc:00:00:00:05"}
	if p1.Version.Supports(FeatureNetworkMTU) {
		nic.MTU = 1500
	}
	if err := steps(
		namedStep{"machine-config", func() error {
			return c1.PutMachineConfig(ctx, MachineConfig{VcpuCount: 1, MemSizeMib: 32, TrackDirtyPages: true})
		}},
		namedStep{"boot-source", func() error {
			return c1.PutBootSource(ctx, BootSource{KernelImagePath: kernel,
				BootArgs: "forkd.ws_mib=2 forkd.rate=20000 ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off"})
		}},
		namedStep{"drive", func() error {
			return c1.PutDrive(ctx, Drive{DriveID: "rootfs", PathOnHost: "rootfs.ext4", IsRootDevice: true})
		}},
		namedStep{"network interface", func() error { return c1.PutNetworkInterface(ctx, nic) }},
		namedStep{"vsock", func() error { return c1.PutVsock(ctx, Vsock{GuestCID: 3, UDSPath: "v.sock"}) }},
		namedStep{"start", func() error { return c1.StartInstance(ctx) }},
		namedStep{"pause", func() error { return c1.Pause(ctx) }},
		namedStep{"full snapshot", func() error { return c1.CreateSnapshot(ctx, snap(SnapshotFull)) }},
		namedStep{"resume", func() error { return c1.Resume(ctx) }},
		namedStep{"pause again", func() error { return c1.Pause(ctx) }},
		namedStep{"diff snapshot", func() error { return c1.CreateSnapshot(ctx, snap(SnapshotDiff)) }},
		namedStep{"kill", func() error { return p1.Kill(ctx) }},
	); err != nil {
		return err
	}

	// Restore with dirty tracking (the restore path), renaming the TAP
	// where the release can (a fork's restore), then a Diff of the
	// restored VM (its next standby).
	p2, c2 := launch("restore")
	load := SnapshotLoad{SnapshotPath: filepath.Join(dir, "vmstate"),
		MemBackend: MemBackend{BackendType: BackendFile, BackendPath: filepath.Join(dir, "memory")}, TrackDirtyPages: true}
	if p2.Version.Supports(FeatureNetworkOverrides) {
		load.NetworkOverrides = []NetworkOverride{{IfaceID: "eth0", HostDevName: "tap1"}}
	}
	// The first VMM's socket is stale (Firecracker leaves it): rebind
	// elsewhere where the release can, else remove it, as the manager does.
	if p2.Version.Supports(FeatureVsockOverride) {
		load.VsockOverride = &VsockOverride{UDSPath: "w.sock"}
	} else if err := os.Remove(filepath.Join(dir, "v.sock")); err != nil {
		t.Fatal(err)
	}
	return steps(
		namedStep{"load", func() error { return c2.LoadSnapshot(ctx, load) }},
		namedStep{"resume after load", func() error { return c2.Resume(ctx) }},
		namedStep{"pause after load", func() error { return c2.Pause(ctx) }},
		namedStep{"diff snapshot after load", func() error { return c2.CreateSnapshot(ctx, snap(SnapshotDiff)) }},
		namedStep{"kill restored", func() error { return p2.Kill(ctx) }},
	)
}

type namedStep struct {
	name string
	do   func() error
}

// TestEveryReleaseAcceptsEveryDriverRequest is the per-version table: the
// strict emulator at each supported release refuses any field that
// release's request structs lack, and accepts everything the driver sends
// it.
func TestEveryReleaseAcceptsEveryDriverRequest(t *testing.T) {
	for _, v := range TestedVersions() {
		ver := fmt.Sprintf("%d.%d", v.Major, v.Minor)
		t.Run(ver, func(t *testing.T) {
			if err := driverScenario(t, ver, nil); err != nil {
				t.Fatalf("Firecracker %s refused a driver request: %v", v, err)
			}
		})
	}
}

// The twin: a driver that ignored the version (here, one that takes every
// VMM for 1.13) sends track_dirty_pages to 1.12, which refuses the whole
// load, so the table test above can fail.
func TestTableTestCatchesADriverIgnoringTheVersion(t *testing.T) {
	err := driverScenario(t, "1.12", func(p *Process) *Client { return NewClientVersion(p.APISock, Version{1, 13, 2}) })
	var apiErr *APIError
	if !errors.As(err, &apiErr) || !strings.Contains(apiErr.FaultMessage, "unknown field `track_dirty_pages`") {
		t.Fatalf("the 1.13 encoding against a 1.12 VMM: %v; want the load refused for track_dirty_pages", err)
	}
}

// The launch reads the emulator's GET /version like a real Firecracker's.
func TestLaunchReadsTheEmulatorsVersion(t *testing.T) {
	dir := shortTempDir(t)
	for _, v := range TestedVersions() {
		p, _ := launchEmulatorVersion(t, dir, fmt.Sprintf("v%d%d", v.Major, v.Minor), fmt.Sprintf("%d.%d", v.Major, v.Minor))
		if p.Version != v {
			t.Errorf("emulator at %d.%d: Process.Version %v, want %v", v.Major, v.Minor, p.Version, v)
		}
	}
}
