package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// fakeVMM is an in-test Firecracker API on a Unix socket: it records the
// last request and answers with a canned status and body. (The emulator is
// the real thing; this only pins the wire format.)
type fakeVMM struct {
	sock   string
	reqs   chan recorded
	status int
	body   string
	block  bool // hold the request until the client gives up
}

type recorded struct {
	method, path, contentType string
	contentLength             int64
	chunked                   bool
	body                      []byte
}

func startFakeVMM(t *testing.T, status int, body string) *fakeVMM {
	t.Helper()
	return startFake(t, &fakeVMM{status: status, body: body})
}

// startBlockingVMM answers no request: each is held until the client gives up.
func startBlockingVMM(t *testing.T) *fakeVMM {
	t.Helper()
	return startFake(t, &fakeVMM{block: true})
}

func startFake(t *testing.T, f *fakeVMM) *fakeVMM {
	t.Helper()
	f.sock = filepath.Join(shortTempDir(t), "fc.sock")
	f.reqs = make(chan recorded, 16)
	ln, err := net.Listen("unix", f.sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: f}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return f
}

func (f *fakeVMM) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	f.reqs <- recorded{r.Method, r.URL.EscapedPath(), r.Header.Get("Content-Type"), r.ContentLength, len(r.TransferEncoding) > 0, b}
	if f.block {
		<-r.Context().Done()
		return
	}
	w.WriteHeader(f.status)
	io.WriteString(w, f.body)
}

// sameJSON compares two JSON documents by value, including the key set:
// a misspelt or missing Firecracker field name fails it.
func sameJSON(t *testing.T, got []byte, want string) bool {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("request body %q is not JSON: %v", got, err)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("bad want %q: %v", want, err)
	}
	return reflect.DeepEqual(g, w)
}

func TestClientSendsFirecrackerRequests(t *testing.T) {
	for _, tc := range []struct {
		name       string
		call       func(context.Context, *Client) error
		method     string
		path       string
		body       string // "" = no body
		answerCode int
	}{
		{"machine config", func(ctx context.Context, c *Client) error {
			return c.PutMachineConfig(ctx, MachineConfig{VcpuCount: 2, MemSizeMib: 1024, TrackDirtyPages: true})
		}, "PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":1024,"track_dirty_pages":true}`, 204},
		{"machine config with smt", func(ctx context.Context, c *Client) error {
			return c.PutMachineConfig(ctx, MachineConfig{VcpuCount: 2, MemSizeMib: 256, Smt: true})
		}, "PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":256,"smt":true,"track_dirty_pages":false}`, 204},
		{"boot source", func(ctx context.Context, c *Client) error {
			return c.PutBootSource(ctx, BootSource{KernelImagePath: "/k/vmlinux", BootArgs: "console=ttyS0 forkd.ws_mib=64"})
		}, "PUT", "/boot-source", `{"kernel_image_path":"/k/vmlinux","boot_args":"console=ttyS0 forkd.ws_mib=64"}`, 204},
		{"drive", func(ctx context.Context, c *Client) error {
			return c.PutDrive(ctx, Drive{DriveID: "rootfs", PathOnHost: "/r.ext4", IsRootDevice: true})
		}, "PUT", "/drives/rootfs", `{"drive_id":"rootfs","path_on_host":"/r.ext4","is_root_device":true,"is_read_only":false}`, 204},
		{"network interface", func(ctx context.Context, c *Client) error {
			return c.PutNetworkInterface(ctx, NetworkInterface{IfaceID: "eth0", HostDevName: "tap0", GuestMAC: "06:00:00:00:00:01"})
		}, "PUT", "/network-interfaces/eth0", `{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:00:00:00:01"}`, 204},
		{"start", func(ctx context.Context, c *Client) error { return c.StartInstance(ctx) },
			"PUT", "/actions", `{"action_type":"InstanceStart"}`, 204},
		{"ctrl-alt-del", func(ctx context.Context, c *Client) error { return c.SendCtrlAltDel(ctx) },
			"PUT", "/actions", `{"action_type":"SendCtrlAltDel"}`, 204},
		{"pause", func(ctx context.Context, c *Client) error { return c.Pause(ctx) },
			"PATCH", "/vm", `{"state":"Paused"}`, 204},
		{"resume", func(ctx context.Context, c *Client) error { return c.Resume(ctx) },
			"PATCH", "/vm", `{"state":"Resumed"}`, 204},
		{"diff snapshot", func(ctx context.Context, c *Client) error {
			return c.CreateSnapshot(ctx, SnapshotCreate{SnapshotType: SnapshotDiff, SnapshotPath: "/s/vmstate", MemFilePath: "/s/memory"})
		}, "PUT", "/snapshot/create", `{"snapshot_type":"Diff","snapshot_path":"/s/vmstate","mem_file_path":"/s/memory"}`, 204},
		{"file load", func(ctx context.Context, c *Client) error {
			return c.LoadSnapshot(ctx, SnapshotLoad{SnapshotPath: "/s/vmstate", MemBackend: MemBackend{BackendFile, "/s/memory"}, TrackDirtyPages: true, ResumeVM: true})
		}, "PUT", "/snapshot/load", `{"snapshot_path":"/s/vmstate","mem_backend":{"backend_type":"File","backend_path":"/s/memory"},"track_dirty_pages":true,"resume_vm":true}`, 204},
		{"uffd load", func(ctx context.Context, c *Client) error {
			return c.LoadSnapshot(ctx, SnapshotLoad{SnapshotPath: "/s/vmstate", MemBackend: MemBackend{BackendUffd, "/p/s1.sock"}})
		}, "PUT", "/snapshot/load", `{"snapshot_path":"/s/vmstate","mem_backend":{"backend_type":"Uffd","backend_path":"/p/s1.sock"},"track_dirty_pages":false,"resume_vm":false}`, 204},
		{"describe", func(ctx context.Context, c *Client) error { _, err := c.Describe(ctx); return err },
			"GET", "/", "", 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			answer := ""
			if tc.answerCode == 200 {
				answer = `{"app_name":"Firecracker","id":"x","state":"Running","vmm_version":"1.13.0"}`
			}
			f := startFakeVMM(t, tc.answerCode, answer)
			// A client that knows its VMM's version, as Process.Client makes.
			if err := tc.call(context.Background(), NewClientVersion(f.sock, Version{1, 13, 2})); err != nil {
				t.Fatalf("call: %v", err)
			}
			r := <-f.reqs
			if r.method != tc.method || r.path != tc.path {
				t.Errorf("request %s %s, want %s %s", r.method, r.path, tc.method, tc.path)
			}
			if tc.body == "" {
				if len(r.body) != 0 {
					t.Errorf("body %q, want none", r.body)
				}
				return
			}
			if !sameJSON(t, r.body, tc.body) {
				t.Errorf("body %s\nwant %s", r.body, tc.body)
			}
			if r.contentType != "application/json" {
				t.Errorf("Content-Type %q, want application/json", r.contentType)
			}
			// Firecracker's HTTP server does not take chunked bodies.
			if r.chunked || r.contentLength != int64(len(r.body)) {
				t.Errorf("chunked=%v Content-Length=%d for a %d-byte body; want a plain Content-Length", r.chunked, r.contentLength, len(r.body))
			}
		})
	}
}

func TestClientDecodesDescribeAndGuest(t *testing.T) {
	f := startFakeVMM(t, 200, `{"app_name":"Firecracker","id":"vm1","state":"Paused","vmm_version":"1.13.1"}`)
	info, err := NewClient(f.sock).Describe(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if want := (InstanceInfo{AppName: "Firecracker", ID: "vm1", State: StatePaused, VMMVersion: "1.13.1"}); info != want {
		t.Errorf("Describe = %+v, want %+v", info, want)
	}

	g := startFakeVMM(t, 200, `{"ticks":9,"pages_read":100,"pages_written":20,"pages_verified":100,"integrity_errors":1,"first_integrity_error":"page 7: bad checksum"}`)
	st, err := NewClient(g.sock).Guest(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if want := (GuestStatus{Ticks: 9, PagesRead: 100, PagesWritten: 20, PagesVerified: 100, IntegrityErrors: 1, FirstIntegrityError: "page 7: bad checksum"}); st != want {
		t.Errorf("Guest = %+v, want %+v", st, want)
	}
	if r := <-g.reqs; r.method != "GET" || r.path != "/guest" {
		t.Errorf("Guest sent %s %s, want GET /guest", r.method, r.path)
	}
}

func TestClientSurfacesFirecrackerErrors(t *testing.T) {
	for _, tc := range []struct {
		name         string
		status       int
		body         string
		wantFault    string
		call         func(context.Context, *Client) error
		notSupported bool
	}{
		{"fault message", 400, `{"fault_message":"Cannot create snapshot: the VM is not paused"}`,
			"Cannot create snapshot: the VM is not paused",
			func(ctx context.Context, c *Client) error {
				return c.CreateSnapshot(ctx, SnapshotCreate{SnapshotPath: "a", MemFilePath: "b"})
			}, false},
		{"plain text body", 500, "internal oops\n", "internal oops",
			func(ctx context.Context, c *Client) error { return c.Resume(ctx) }, false},
		{"guest on real firecracker (400)", 400, `{"fault_message":"Invalid request method and/or path: GET /guest."}`,
			"Invalid request method and/or path: GET /guest.",
			func(ctx context.Context, c *Client) error { _, err := c.Guest(ctx); return err }, true},
		{"guest 404", 404, `{"fault_message":"not found"}`, "not found",
			func(ctx context.Context, c *Client) error { _, err := c.Guest(ctx); return err }, true},
		{"guest 500 is a real error", 500, `{"fault_message":"workload crashed"}`, "workload crashed",
			func(ctx context.Context, c *Client) error { _, err := c.Guest(ctx); return err }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := startFakeVMM(t, tc.status, tc.body)
			err := tc.call(context.Background(), NewClient(f.sock))
			var apiErr *APIError
			if !errors.As(err, &apiErr) {
				t.Fatalf("error %v (%T), want an *APIError", err, err)
			}
			r := <-f.reqs
			if apiErr.Status != tc.status || apiErr.FaultMessage != tc.wantFault || apiErr.Method != r.method || apiErr.Path != r.path {
				t.Errorf("APIError = %+v, want status %d fault %q for %s %s", apiErr, tc.status, tc.wantFault, r.method, r.path)
			}
			if got := errors.Is(err, ErrNotSupported); got != tc.notSupported {
				t.Errorf("errors.Is(err, ErrNotSupported) = %v, want %v (err: %v)", got, tc.notSupported, err)
			}
			if !strings.Contains(err.Error(), tc.wantFault) {
				t.Errorf("error text %q does not quote the fault message", err)
			}
		})
	}
}

func TestClientBoundsEachCall(t *testing.T) {
	f := startBlockingVMM(t)
	c := NewClient(f.sock).WithTimeouts(Timeouts{Call: 100 * time.Millisecond})
	err := c.Pause(context.Background())
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Pause against a VMM that never answers: %v, want a deadline error", err)
	}
}

// A hostile VMM (a guest escaped into it) cannot make the daemon read an
// endless answer: one over the cap fails the call after at most the cap
// plus a byte; one under it decodes (the twin).
func TestClientRefusesAnOversizedAnswer(t *testing.T) {
	pad := func(n int) string { return `{"state":"Running","id":"` + strings.Repeat("x", n) + `"}` }
	big := startFakeVMM(t, 200, pad(maxAnswerBody))
	if _, err := NewClient(big.sock).Describe(context.Background()); err == nil || !strings.Contains(err.Error(), "answer over") {
		t.Errorf("Describe of a %d-byte answer: %v, want a refusal", maxAnswerBody+30, err)
	}
	small := startFakeVMM(t, 200, pad(maxAnswerBody-100))
	if _, err := NewClient(small.sock).Describe(context.Background()); err != nil {
		t.Errorf("Describe of an answer under the cap: %v", err)
	}
}

func TestClientHonoursCallerContext(t *testing.T) {
	f := startBlockingVMM(t)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-f.reqs; cancel() }()
	err := NewClient(f.sock).Resume(ctx)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Resume with a cancelled ctx: %v, want context.Canceled", err)
	}
}

func TestClientReportsMissingSocket(t *testing.T) {
	sock := filepath.Join(shortTempDir(t), "absent.sock")
	_, err := NewClient(sock).Describe(context.Background())
	if err == nil || !strings.Contains(err.Error(), sock) {
		t.Errorf("Describe on a missing socket: %v, want an error naming %s", err, sock)
	}
}

func TestPutDriveRejectsEmptyID(t *testing.T) {
	f := startFakeVMM(t, 204, "")
	if err := NewClient(f.sock).PutDrive(context.Background(), Drive{PathOnHost: "/x"}); err == nil {
		t.Error("PutDrive with an empty drive_id succeeded")
	}
}
