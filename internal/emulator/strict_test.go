package emulator

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Serde's messages, position included: the texts Firecracker's own API
// tests match ("missing field `vcpu_count` at line 1 column 21.").
func TestSchemaRefusesAsSerdeDoes(t *testing.T) {
	s := requestSchemas(release{1, 16, 1})
	for _, tc := range []struct {
		route, body, want string
	}{
		{"PUT machine-config", `{"mem_size_mib": 128}`, "missing field `vcpu_count` at line 1 column 21."},
		{"PUT machine-config", `{"vcpu_count": 2}`, "missing field `mem_size_mib` at line 1 column 17."},
		{"PATCH drives", `{"drive_id":"scratch","path_on_host":"foo.bar","is_read_only":true}`,
			"unknown field `is_read_only`, expected one of `drive_id`, `path_on_host`, `rate_limiter` at line 1 column 61."},
		{"PATCH vm", `{"state":"Paused","state":"Resumed"}`, "duplicate field `state` at line 1 column 25."},
		{"PATCH vm", "{\n  \"stat\": 1\n}", "unknown field `stat`, expected `state` at line 2 column 8."},
		{"PUT snapshot/load", `{"snapshot_path":"s","mem_backend":{"backend_path":"m","backend_type":"File","x":1}}`,
			"unknown field `x`, expected `backend_path` or `backend_type` at line 1 column 80."},
		{"PUT snapshot/load", `{"snapshot_path":"s","mem_backend":{"backend_path":"m"}}`,
			"missing field `backend_type` at line 1 column 55."},
		// NetworkOverride is not deny_unknown_fields: extra keys pass, missing ones do not.
		{"PUT snapshot/load", `{"snapshot_path":"s","network_overrides":[{"iface_id":"a","host_dev_name":"b","mtu":9}]}`, ""},
		{"PUT snapshot/load", `{"snapshot_path":"s","network_overrides":[{"iface_id":"a"}]}`,
			"missing field `host_dev_name` at line 1 column 58."},
		// The deprecated snapshot/create "version" (Firecracker 1.4 and older) is gone.
		{"PUT snapshot/create", `{"snapshot_path":"s","mem_file_path":"m","version":"1.0.0"}`,
			"unknown field `version`, expected one of `snapshot_type`, `snapshot_path`, `mem_file_path`"},
	} {
		err := s[tc.route].check([]byte(tc.body))
		got := ""
		if err != nil {
			got = err.Error()
		}
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s %s: refused with %q, want accepted", tc.route, tc.body, got)
		case tc.want != "" && !strings.Contains(got, tc.want):
			t.Errorf("%s %s: %q, want %q", tc.route, tc.body, got, tc.want)
		case tc.want != "" && !strings.HasPrefix(got, "An error occurred when deserializing the json body of a request: "):
			t.Errorf("%s: %q lacks Firecracker's deserialization prefix", tc.route, got)
		}
	}
}

// fieldCase is one request field whose existence depends on the release:
// a request carrying it must be refused as an unknown field by releases
// before since (unknown: never), and get past decoding from since on.
type fieldCase struct {
	name, method, path string
	body               map[string]any
	field              string
	since              string // "" = no supported release has it
}

func versionedFields(dir string) []fieldCase {
	load := func(extra map[string]any) map[string]any {
		b := map[string]any{"snapshot_path": filepath.Join(dir, "none"),
			"mem_backend": map[string]any{"backend_type": "File", "backend_path": filepath.Join(dir, "none")}}
		for k, v := range extra {
			b[k] = v
		}
		return b
	}
	return []fieldCase{
		{"load track_dirty_pages", "PUT", "/snapshot/load", load(map[string]any{"track_dirty_pages": true}), "track_dirty_pages", "1.13.0"},
		{"load network_overrides", "PUT", "/snapshot/load",
			load(map[string]any{"network_overrides": []any{map[string]any{"iface_id": "eth0", "host_dev_name": "tap1"}}}), "network_overrides", "1.12.0"},
		{"load vsock_override", "PUT", "/snapshot/load", load(map[string]any{"vsock_override": map[string]any{"uds_path": "v.sock"}}), "vsock_override", "1.16.0"},
		{"load clock_realtime", "PUT", "/snapshot/load", load(map[string]any{"clock_realtime": true}), "clock_realtime", "1.14.4"},
		{"load huge_pages", "PUT", "/snapshot/load", load(map[string]any{"huge_pages": "None"}), "huge_pages", ""},
		{"network interface mtu", "PUT", "/network-interfaces/eth0",
			map[string]any{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 1500}, "mtu", "1.16.0"},
		{"machine-config gdb_socket_path", "PUT", "/machine-config",
			map[string]any{"vcpu_count": 1, "mem_size_mib": 16, "gdb_socket_path": "/g"}, "gdb_socket_path", ""},
	}
}

// TestEachReleaseKnowsOnlyItsFields is the emulator's side of the
// per-version table: for every supported release, every field that came
// or went is refused exactly where that release's request structs lack it.
func TestEachReleaseKnowsOnlyItsFields(t *testing.T) {
	for _, ver := range SupportedVersions() {
		t.Run(ver, func(t *testing.T) {
			dir := t.TempDir()
			rel, _, err := lookupRelease(ver)
			if err != nil {
				t.Fatal(err)
			}
			p := startVMMVersion(t, dir, ver)
			var vi map[string]string
			if err := json.Unmarshal([]byte(p.must("GET", "/version", nil, 200)), &vi); err != nil || vi["firecracker_version"] != rel.String() {
				t.Fatalf("GET /version = %v (%v), want firecracker_version %s", vi, err, rel)
			}
			for _, fc := range versionedFields(dir) {
				p.t = t
				has := fc.since != "" && !releaseBefore(t, rel, fc.since)
				code, out := p.call(fc.method, fc.path, fc.body)
				refusedAsUnknown := code == http.StatusBadRequest && strings.Contains(out, "unknown field `"+fc.field+"`")
				if has == refusedAsUnknown {
					t.Errorf("%s at %s (field since %q): status %d %s", fc.name, rel, fc.since, code, out)
				}
			}
		})
	}
}

func releaseBefore(t *testing.T, r release, since string) bool {
	t.Helper()
	s, _, err := lookupRelease(since)
	if err != nil {
		t.Fatalf("since %q: %v", since, err)
	}
	return !r.atLeast(s.major, s.minor, s.patch)
}

// The twin of the driver's table test: Firecracker 1.12 does not know
// track_dirty_pages on /snapshot/load, and neither does the emulator at
// 1.12, so a driver that sent it there would fail its table test.
func TestRelease112RefusesTrackDirtyPagesOnLoad(t *testing.T) {
	dir := t.TempDir()
	p := startVMMVersion(t, dir, "1.12")
	p.fault("PUT", "/snapshot/load", map[string]any{"snapshot_path": "s",
		"mem_backend": map[string]any{"backend_type": "File", "backend_path": "m"}, "track_dirty_pages": true},
		"An error occurred when deserializing the json body of a request: unknown field `track_dirty_pages`, expected one of "+
			"`snapshot_path`, `mem_file_path`, `mem_backend`, `enable_diff_snapshots`, `resume_vm`, `network_overrides` at line 1 column")
	if got := p.state(); got != "Not started" {
		t.Fatalf("state %q after a refused load, want Not started (a refused body changes nothing)", got)
	}
}

// Firecracker loads a snapshot only of its own data format major version and
// no newer minor: 1.14 loads 1.13's (both 8.0.0), 1.13 refuses 1.16's
// (10.0.0) and 1.12's (6.0.0).
func TestLoadRefusesAnotherSnapshotDataVersion(t *testing.T) {
	dir := t.TempDir()
	snap := func(ver string) (string, string) {
		d := filepath.Join(dir, ver)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		p := startVMMVersion(t, d, ver)
		p.boot(bootSpec{vcpus: 1, memMib: 16, track: true, bootArgs: "forkd.ws_mib=2 forkd.rate=20000"})
		p.waitTicks(20)
		p.pause()
		vmstate, mem := filepath.Join(d, "vmstate"), filepath.Join(d, "mem")
		p.snapshot("Full", vmstate, mem)
		return vmstate, mem
	}
	load := func(ver, vmstate, mem string) (int, string) {
		p := startVMMVersion(t, dir, ver)
		return p.call("PUT", "/snapshot/load", map[string]any{"snapshot_path": vmstate,
			"mem_backend": map[string]any{"backend_type": "File", "backend_path": mem}, "resume_vm": true})
	}
	s13, m13 := snap("1.13")
	s16, m16 := snap("1.16")
	s12, m12 := snap("1.12")
	for _, tc := range []struct {
		loader, vmstate, mem, want string
	}{
		{"1.14", s13, m13, ""},
		{"1.13", s13, m13, ""},
		{"1.13", s16, m16, "Invalid data version: 10.0.0"},
		{"1.13", s12, m12, "Invalid data version: 6.0.0"},
		{"1.12", s13, m13, "Invalid data version: 8.0.0"},
	} {
		code, out := load(tc.loader, tc.vmstate, tc.mem)
		if tc.want == "" && code != http.StatusNoContent {
			t.Errorf("%s loading %s: %d %s, want 204", tc.loader, tc.vmstate, code, out)
		}
		if tc.want != "" && (code != http.StatusBadRequest || !strings.Contains(out, "Load snapshot error: Failed to restore from snapshot") ||
			!strings.Contains(out, tc.want)) {
			t.Errorf("%s loading %s: %d %s, want 400 with %q", tc.loader, tc.vmstate, code, out, tc.want)
		}
	}
}
