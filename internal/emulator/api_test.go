package emulator

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

type apiCase struct {
	name         string
	method, path string
	body         any
	status       int    // expected status
	fault        string // for 400: a substring of fault_message
}

func runAPICases(t *testing.T, p *vmmProc, cases []apiCase) {
	t.Helper()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p.t = t
			if c.status == 400 {
				p.fault(c.method, c.path, c.body, c.fault)
				return
			}
			p.must(c.method, c.path, c.body, c.status)
		})
	}
}

func TestAPIFollowsFirecrackerOrderingAndValidation(t *testing.T) {
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinux")
	rootfs := filepath.Join(dir, "rootfs.ext4")
	for _, f := range []string{kernel, rootfs} {
		if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	missing := filepath.Join(dir, "missing")
	p := startVMM(t, dir)
	if got := p.state(); got != "Not started" {
		t.Fatalf("fresh VMM state %q, want Not started", got)
	}

	preBoot := []apiCase{
		{"unknown path", "GET", "/nope", nil, 400, "Invalid request method and/or path"},
		{"guest before boot", "GET", "/guest", nil, 400, "before starting"},
		{"pause before boot", "PATCH", "/vm", map[string]any{"state": "Paused"}, 400, "before starting"},
		{"snapshot before boot", "PUT", "/snapshot/create", map[string]any{"snapshot_path": "a", "mem_file_path": "b"}, 400, "before starting"},
		{"start without kernel", "PUT", "/actions", map[string]any{"action_type": "InstanceStart"}, 400, "without kernel configuration"},
		{"unknown action", "PUT", "/actions", map[string]any{"action_type": "Reboot"}, 400, "unknown variant"},
		{"machine-config unknown field", "PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 32, "ballon": 1}, 400, "unknown field"},
		{"machine-config malformed JSON", "PUT", "/machine-config", `{"vcpu_count": 1,`, 400, "deserializing"},
		{"machine-config empty body", "PUT", "/machine-config", "", 400, "Empty PUT request."},
		{"machine-config missing mem", "PUT", "/machine-config", map[string]any{"vcpu_count": 1}, 400, "mem_size_mib"},
		{"machine-config zero vcpus", "PUT", "/machine-config", map[string]any{"vcpu_count": 0, "mem_size_mib": 32}, 400, "Machine config error: The number of vCPUs must be greater than 0"},
		{"machine-config too many vcpus", "PUT", "/machine-config", map[string]any{"vcpu_count": 33, "mem_size_mib": 32}, 400, "Machine config error: The number of vCPUs must be greater than 0"},
		{"machine-config odd vcpus with smt", "PUT", "/machine-config", map[string]any{"vcpu_count": 3, "mem_size_mib": 32, "smt": true}, 400, "Machine config error: The number of vCPUs must be greater than 0"},
		{"machine-config zero memory", "PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 0}, 400, "Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size."},
		{"machine-config", "PUT", "/machine-config", map[string]any{"vcpu_count": 2, "mem_size_mib": 32, "track_dirty_pages": true}, 204, ""},
		{"machine-config patch", "PATCH", "/machine-config", map[string]any{"mem_size_mib": 32}, 204, ""},
		{"boot-source missing kernel file", "PUT", "/boot-source", map[string]any{"kernel_image_path": missing}, 400, "kernel file cannot be opened"},
		{"boot-source without kernel field", "PUT", "/boot-source", map[string]any{"boot_args": "console=ttyS0"}, 400, "kernel_image_path"},
		{"boot-source bad forkd arg", "PUT", "/boot-source", map[string]any{"kernel_image_path": kernel, "boot_args": "forkd.ws_mib=lots"}, 400, "forkd.ws_mib"},
		{"boot-source", "PUT", "/boot-source", map[string]any{"kernel_image_path": kernel, "boot_args": "console=ttyS0 forkd.ws_mib=4 forkd.rate=1000"}, 204, ""},
		{"drive missing path_on_host file", "PUT", "/drives/rootfs", map[string]any{"drive_id": "rootfs", "is_root_device": true, "path_on_host": missing}, 400, "Unable to create the block device"},
		{"drive id mismatch", "PUT", "/drives/rootfs", map[string]any{"drive_id": "other", "is_root_device": true, "path_on_host": rootfs}, 400, "does not match"},
		{"drive missing is_root_device", "PUT", "/drives/rootfs", map[string]any{"drive_id": "rootfs", "path_on_host": rootfs}, 400, "is_root_device"},
		{"drive unknown field", "PUT", "/drives/rootfs", map[string]any{"drive_id": "rootfs", "is_root_device": true, "path_on_host": rootfs, "readonly": true}, 400, "unknown field"},
		{"drive", "PUT", "/drives/rootfs", map[string]any{"drive_id": "rootfs", "is_root_device": true, "path_on_host": rootfs, "is_read_only": false}, 204, ""},
		{"second root drive", "PUT", "/drives/data", map[string]any{"drive_id": "data", "is_root_device": true, "path_on_host": rootfs}, 400, "root block device already exists"},
		// The TAPs are opened for real; a test that has one runs in a
		// namespace of its own (net_test.go). Here, in the test process's
		// namespace, only refusals: none of them opens or creates a device.
		{"network interface without its TAP", "PUT", "/network-interfaces/eth0", map[string]any{"iface_id": "eth0", "host_dev_name": "fkdnotap0", "guest_mac": "06:00:ac:10:00:02"}, 400, "Open tap device failed: Error while creating ifreq structure: No such device (os error 19)"},
		{"network interface TAP name too long", "PUT", "/network-interfaces/eth0", map[string]any{"iface_id": "eth0", "host_dev_name": "fkd-far-too-long0"}, 400, "Invalid interface name"},
		{"network interface missing host_dev_name", "PUT", "/network-interfaces/eth1", map[string]any{"iface_id": "eth1"}, 400, "host_dev_name"},
		{"network interface bad MAC", "PUT", "/network-interfaces/eth0", map[string]any{"iface_id": "eth0", "host_dev_name": "fkdnotap0", "guest_mac": "06:00:ac:10:00"}, 400, "The provided MAC address is invalid."},
		{"network interface MAC with a short field", "PUT", "/network-interfaces/eth0", map[string]any{"iface_id": "eth0", "host_dev_name": "fkdnotap0", "guest_mac": "6:00:ac:10:00:02:"}, 400, "The provided MAC address is invalid."},
		{"network interface id mismatch", "PUT", "/network-interfaces/eth0", map[string]any{"iface_id": "eth1", "host_dev_name": "fkdnotap0"}, 400, "does not match"},
		{"network interface bad path id", "PUT", "/network-interfaces/eth-0", map[string]any{"iface_id": "eth-0", "host_dev_name": "fkdnotap0"}, 400, "alphanumeric characters and underscores"},
		{"network interface patch before boot", "PATCH", "/network-interfaces/eth0", map[string]any{"iface_id": "eth0"}, 400, "not supported before starting"},
		{"load after configuring", "PUT", "/snapshot/load", map[string]any{"snapshot_path": "x", "mem_file_path": "y"}, 400, "not allowed after configuring"},
		{"start", "PUT", "/actions", map[string]any{"action_type": "InstanceStart"}, 204, ""},
	}
	runAPICases(t, p, preBoot)
	p.t = t
	if got := p.state(); got != "Running" {
		t.Fatalf("state after InstanceStart %q, want Running", got)
	}
	snap := filepath.Join(dir, "vmstate")
	mem := filepath.Join(dir, "mem")
	postBoot := []apiCase{
		{"machine-config after boot", "PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 32}, 400, "not supported after starting"},
		{"boot-source after boot", "PUT", "/boot-source", map[string]any{"kernel_image_path": kernel}, 400, "not supported after starting"},
		{"drive put after boot", "PUT", "/drives/rootfs", map[string]any{"drive_id": "rootfs", "is_root_device": true, "path_on_host": rootfs}, 400, "not supported after starting"},
		{"drive patch after boot", "PATCH", "/drives/rootfs", map[string]any{"drive_id": "rootfs", "path_on_host": rootfs}, 204, ""},
		{"network interface put after boot", "PUT", "/network-interfaces/eth0", map[string]any{"iface_id": "eth0", "host_dev_name": "fkdnotap0"}, 400, "not supported after starting"},
		{"network interface patch of an unknown interface", "PATCH", "/network-interfaces/eth9", map[string]any{"iface_id": "eth9"}, 400, "Device not found"},
		{"start twice", "PUT", "/actions", map[string]any{"action_type": "InstanceStart"}, 400, "not supported after starting"},
		{"load on a booted process", "PUT", "/snapshot/load", map[string]any{"snapshot_path": "x", "mem_file_path": "y"}, 400, "not allowed after configuring"},
		{"snapshot while running", "PUT", "/snapshot/create", map[string]any{"snapshot_path": snap, "mem_file_path": mem}, 400, "must be paused"},
		{"bad vm state", "PATCH", "/vm", map[string]any{"state": "Stopped"}, 400, "unknown variant"},
		{"resume while running is idempotent", "PATCH", "/vm", map[string]any{"state": "Resumed"}, 204, ""},
		{"pause", "PATCH", "/vm", map[string]any{"state": "Paused"}, 204, ""},
		{"pause twice is idempotent", "PATCH", "/vm", map[string]any{"state": "Paused"}, 204, ""},
		{"snapshot missing mem_file_path", "PUT", "/snapshot/create", map[string]any{"snapshot_path": snap}, 400, "mem_file_path"},
		{"snapshot unknown type", "PUT", "/snapshot/create", map[string]any{"snapshot_type": "Incremental", "snapshot_path": snap, "mem_file_path": mem}, 400, "unknown variant"},
		{"snapshot into a missing directory", "PUT", "/snapshot/create", map[string]any{"snapshot_path": snap, "mem_file_path": filepath.Join(missing, "mem")}, 400, "Create snapshot error"},
		{"full snapshot", "PUT", "/snapshot/create", map[string]any{"snapshot_type": "Full", "snapshot_path": snap, "mem_file_path": mem}, 204, ""},
		{"diff snapshot with tracking", "PUT", "/snapshot/create", map[string]any{"snapshot_type": "Diff", "snapshot_path": snap + ".diff", "mem_file_path": mem + ".diff"}, 204, ""},
		{"resume", "PATCH", "/vm", map[string]any{"state": "Resumed"}, 204, ""},
		{"flush metrics", "PUT", "/actions", map[string]any{"action_type": "FlushMetrics"}, 204, ""},
	}
	runAPICases(t, p, postBoot)
	p.t = t
	if got := p.state(); got != "Running" {
		t.Fatalf("state after resume %q, want Running", got)
	}
	var cfg map[string]json.RawMessage
	if err := json.Unmarshal([]byte(p.must("GET", "/vm/config", nil, 200)), &cfg); err != nil || cfg["machine-config"] == nil {
		t.Fatalf("GET /vm/config: %v %s", err, cfg)
	}
}

// Before 1.13 a Diff snapshot needs dirty tracking; from 1.13 Firecracker
// makes up the dirty set with mincore, so the same request succeeds.
func TestDiffSnapshotWithoutDirtyTrackingFollowsTheRelease(t *testing.T) {
	for _, tc := range []struct {
		version string
		refused bool
	}{{"1.12", true}, {"1.13", false}, {"1.16", false}} {
		t.Run(tc.version, func(t *testing.T) {
			dir := t.TempDir()
			p := startVMMVersion(t, dir, tc.version)
			p.boot(bootSpec{vcpus: 1, memMib: 16, track: false, bootArgs: "forkd.ws_mib=2"})
			p.waitTicks(50)
			p.pause()
			req := map[string]any{"snapshot_type": "Diff", "snapshot_path": filepath.Join(dir, "s"), "mem_file_path": filepath.Join(dir, "m")}
			if tc.refused {
				p.fault("PUT", "/snapshot/create", req, "Diff snapshots are not allowed on uVMs with dirty page tracking disabled")
				return
			}
			p.must("PUT", "/snapshot/create", req, 204)
			// The guest touched its working set since boot: mincore reports it.
			if n := dataBytes(t, filepath.Join(dir, "m")); n == 0 {
				t.Fatalf("a mincore Diff wrote no data")
			}
		})
	}
}

func TestLoadRequestValidation(t *testing.T) {
	dir := t.TempDir()
	// Request-shape errors are refused before the load starts, so the same
	// fresh process stays usable for each case.
	p := startVMM(t, dir)
	runAPICases(t, p, []apiCase{
		{"both mem_backend and mem_file_path", "PUT", "/snapshot/load", map[string]any{"snapshot_path": "s", "mem_file_path": "m",
			"mem_backend": map[string]any{"backend_type": "File", "backend_path": "m"}}, 400, "too many fields"},
		{"no memory backend", "PUT", "/snapshot/load", map[string]any{"snapshot_path": "s"}, 400, "mem_backend"},
		{"unknown backend type", "PUT", "/snapshot/load", map[string]any{"snapshot_path": "s",
			"mem_backend": map[string]any{"backend_type": "Shm", "backend_path": "m"}}, 400, "unknown variant"},
		{"unknown field", "PUT", "/snapshot/load", map[string]any{"snapshot_path": "s", "mem_file_path": "m", "resume": true}, 400, "unknown field"},
	})
	p.t = t
	if got := p.state(); got != "Not started" {
		t.Fatalf("state %q after refused requests, want Not started", got)
	}
}

func TestLoadFailureLeavesProcessUnusable(t *testing.T) {
	dir := t.TempDir()
	_, vmstate, mem := bootedSnapshot(t, dir, bootSpec{vcpus: 1, memMib: 16, bootArgs: "forkd.ws_mib=2 forkd.rate=20000"}, 100)

	corrupt := filepath.Join(dir, "corrupt.vmstate")
	data, err := os.ReadFile(vmstate)
	if err != nil {
		t.Fatal(err)
	}
	data[len(data)/2] ^= 0x20
	if err := os.WriteFile(corrupt, data, 0o600); err != nil {
		t.Fatal(err)
	}
	short := filepath.Join(dir, "short.mem")
	copyFile(t, mem, short)
	if err := os.Truncate(short, 8<<20); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, vmstate, mem, fault string
	}{
		{"vmstate CRC mismatch", corrupt, mem, "CRC64 mismatch"},
		{"mem file shorter than RAM", vmstate, short, "shorter than guest memory"},
		{"missing vmstate", filepath.Join(dir, "nope"), mem, "no such file"},
		{"missing mem file", vmstate, filepath.Join(dir, "nope"), "no such file"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := startVMM(t, dir)
			p.fault("PUT", "/snapshot/load", map[string]any{"snapshot_path": c.vmstate, "mem_file_path": c.mem}, c.fault)
			p.fault("PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 16}, "unusable")
			p.fault("PUT", "/snapshot/load", map[string]any{"snapshot_path": vmstate, "mem_file_path": mem}, "unusable")
		})
	}
	// The twin: the intact files load (deprecated mem_file_path and
	// enable_diff_snapshots forms included).
	p := startVMM(t, dir)
	p.must("PUT", "/snapshot/load", map[string]any{"snapshot_path": vmstate, "mem_file_path": mem,
		"enable_diff_snapshots": true}, 204)
	if got := p.state(); got != "Paused" {
		t.Fatalf("state after load without resume_vm: %q, want Paused", got)
	}
}

func TestSendCtrlAltDelExitsTheProcess(t *testing.T) {
	dir := t.TempDir()
	p := startVMM(t, dir)
	p.fault("PUT", "/actions", map[string]any{"action_type": "SendCtrlAltDel"}, "before starting")
	p.boot(bootSpec{vcpus: 1, memMib: 16, bootArgs: "forkd.ws_mib=2"})
	p.must("PUT", "/actions", map[string]any{"action_type": "SendCtrlAltDel"}, 204)
	if err := p.waitExit(10 * time.Second); err != nil {
		t.Fatalf("vmm exit status after SendCtrlAltDel: %v, want 0", err)
	}
}

func TestRefusesExistingAPISocketPath(t *testing.T) {
	dir := t.TempDir()
	p := startVMM(t, dir)
	err := Main(t.Context(), []string{"--api-sock", p.sock}, os.Stderr)
	if err == nil {
		t.Fatalf("a second VMM on %s started; want a refusal", p.sock)
	}
}

// Finding: a VMM's API accepted snapshot and memory paths anywhere on the
// host (the socket is root's, but still). With --confine-paths (which the
// manager passes: its data dir) create and load refuse a path outside it or
// through a symlink below it; a path inside it works (the twin).
func TestConfinedSnapshotPaths(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	outside := t.TempDir()
	if err := os.MkdirAll(filepath.Join(data, "snap"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.Symlink(outside, filepath.Join(data, "link"))
	confine := func(c *exec.Cmd) error {
		c.Args = append(c.Args, "--confine-paths", data)
		return c.Start()
	}
	p := startVMMWith(t, data, confine)
	p.boot(bootSpec{vcpus: 1, memMib: 16, bootArgs: "forkd.ws_mib=2"})
	p.pause()
	for _, tc := range []struct{ vmstate, mem, says string }{
		{filepath.Join(outside, "vmstate"), filepath.Join(data, "snap", "memory"), "not inside"},
		{filepath.Join(data, "snap", "vmstate"), filepath.Join(outside, "memory"), "not inside"},
		{filepath.Join(data, "link", "vmstate"), filepath.Join(data, "snap", "memory"), "symlink"},
	} {
		p.fault("PUT", "/snapshot/create", map[string]any{"snapshot_type": "Full", "snapshot_path": tc.vmstate, "mem_file_path": tc.mem}, tc.says)
	}
	if ents, _ := os.ReadDir(outside); len(ents) != 0 {
		t.Fatalf("a refused snapshot wrote %d files outside the data dir", len(ents))
	}
	vmstate, mem := filepath.Join(data, "snap", "vmstate"), filepath.Join(data, "snap", "memory")
	p.snapshot("Full", vmstate, mem)

	q := startVMMWith(t, data, confine)
	copyFile(t, vmstate, filepath.Join(outside, "vmstate"))
	q.fault("PUT", "/snapshot/load", map[string]any{"snapshot_path": filepath.Join(outside, "vmstate"),
		"mem_backend": map[string]any{"backend_type": "File", "backend_path": mem}}, "not inside")
	r := startVMMWith(t, data, confine)
	r.loadFile(vmstate, mem, true, true)

	// The vsock device's socket is bound where uds_path says: inside only.
	s := startVMMWith(t, data, confine)
	s.fault("PUT", "/vsock", map[string]any{"guest_cid": 3, "uds_path": filepath.Join(outside, "v.sock")}, "not inside")
	s.fault("PUT", "/vsock", map[string]any{"guest_cid": 3, "uds_path": filepath.Join(data, "link", "v.sock")}, "symlink")
	if ents, _ := os.ReadDir(outside); len(ents) != 1 { // the vmstate copied above
		t.Fatalf("a refused vsock bound a socket outside the data dir: %d entries there", len(ents))
	}
	s.must("PUT", "/vsock", map[string]any{"guest_cid": 3, "uds_path": filepath.Join(data, "s.sock")}, 204)
}
