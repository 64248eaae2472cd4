package emulator

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/testenv"
)

// childEnv makes the test binary run the emulator's Main instead of the
// tests: every VMM in these tests is a real, separate process.
const childEnv = "FORKD_EMULATOR_TEST_VMM"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		if err := Main(context.Background(), os.Args[1:], os.Stderr); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(testenv.Main(m))
}

// vmmProc is one `forkd vmm` process under test.
type vmmProc struct {
	t      testing.TB
	name   string
	dir    string
	sock   string
	logf   string
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // the exit status, once exited is closed
	client *http.Client
}

var procSeq atomic.Int64

// startVMM starts a VMM process in dir, as the default (newest) release,
// and waits for its API socket.
func startVMM(t testing.TB, dir string) *vmmProc {
	t.Helper()
	return startVMMWith(t, dir, (*exec.Cmd).Start)
}

// startVMMWith is startVMM with the process started by start (e.g. inside
// a network namespace).
func startVMMWith(t testing.TB, dir string, start func(*exec.Cmd) error) *vmmProc {
	t.Helper()
	return startVMMOpts(t, dir, DefaultFirecrackerVersion(), start)
}

// startVMMVersion is startVMM as Firecracker release version.
func startVMMVersion(t testing.TB, dir, version string) *vmmProc {
	t.Helper()
	return startVMMOpts(t, dir, version, (*exec.Cmd).Start)
}

func startVMMOpts(t testing.TB, dir, version string, start func(*exec.Cmd) error) *vmmProc {
	t.Helper()
	n := procSeq.Add(1)
	p := &vmmProc{t: t, name: fmt.Sprintf("vm%d", n), dir: dir, exited: make(chan struct{})}
	p.sock = filepath.Join(dir, p.name+".sock")
	p.logf = filepath.Join(dir, p.name+".log")
	p.cmd = exec.Command(os.Args[0], "--api-sock", p.sock, "--id", p.name, "--log-path", p.logf, "--level", "Debug",
		"--firecracker-version", version)
	p.cmd.Env = append(os.Environ(), childEnv+"=1")
	var stderr bytes.Buffer
	p.cmd.Stderr = &stderr
	if err := start(p.cmd); err != nil {
		t.Fatalf("start vmm: %v", err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.exited
		if t.Failed() {
			if b, err := os.ReadFile(p.logf); err == nil {
				t.Logf("%s log:\n%s", p.name, b)
			}
			if stderr.Len() > 0 {
				t.Logf("%s stderr:\n%s", p.name, stderr.String())
			}
		}
	})
	p.client = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", p.sock)
		},
	}}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", p.sock); err == nil {
			c.Close()
			return p
		}
		select {
		case <-p.exited:
			t.Fatalf("vmm %s exited before listening: %v\n%s", p.name, p.err, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("vmm %s: API socket %s did not appear", p.name, p.sock)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// call sends one API request; body is marshalled unless it is a string.
func (p *vmmProc) call(method, path string, body any) (int, string) {
	p.t.Helper()
	code, out, err := p.callErr(method, path, body)
	if err != nil {
		p.t.Fatalf("%s %s %s: %v", p.name, method, path, err)
	}
	return code, out
}

// callErr is call that returns a transport error (the VMM died) instead of
// failing the test.
func (p *vmmProc) callErr(method, path string, body any) (int, string, error) {
	p.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		data, err := json.Marshal(b)
		if err != nil {
			p.t.Fatal(err)
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, "http://localhost"+path, rd)
	if err != nil {
		p.t.Fatal(err)
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(out), nil
}

// must sends a request that must succeed with want.
func (p *vmmProc) must(method, path string, body any, want int) string {
	p.t.Helper()
	code, out := p.call(method, path, body)
	if code != want {
		p.t.Fatalf("%s %s %s: status %d (%s), want %d", p.name, method, path, code, out, want)
	}
	return out
}

// fault sends a request that must be refused with 400 and a fault_message
// containing want.
func (p *vmmProc) fault(method, path string, body any, want string) {
	p.t.Helper()
	code, out := p.call(method, path, body)
	var f struct {
		FaultMessage string `json:"fault_message"`
	}
	if code != http.StatusBadRequest || json.Unmarshal([]byte(out), &f) != nil || !strings.Contains(f.FaultMessage, want) {
		p.t.Fatalf("%s %s %s: got %d %s, want 400 with fault_message containing %q", p.name, method, path, code, out, want)
	}
}

func (p *vmmProc) state() string {
	p.t.Helper()
	var info instanceInfo
	if err := json.Unmarshal([]byte(p.must("GET", "/", nil, 200)), &info); err != nil {
		p.t.Fatal(err)
	}
	return info.State
}

func (p *vmmProc) guest() GuestStats {
	p.t.Helper()
	var st GuestStats
	if err := json.Unmarshal([]byte(p.must("GET", "/guest", nil, 200)), &st); err != nil {
		p.t.Fatal(err)
	}
	return st
}

// waitTicks waits until this process's workload ran at least n steps.
func (p *vmmProc) waitTicks(n uint64) GuestStats {
	p.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		st := p.guest()
		if st.Ticks >= n {
			return st
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s: workload ran %d steps in 60s, want %d", p.name, st.Ticks, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitExit waits for the process to exit by itself.
func (p *vmmProc) waitExit(d time.Duration) error {
	p.t.Helper()
	select {
	case <-p.exited:
		return p.err
	case <-time.After(d):
		p.t.Fatalf("%s did not exit within %v", p.name, d)
		return nil
	}
}

type bootSpec struct {
	vcpus, memMib int
	track         bool
	huge          bool // huge_pages 2M
	bootArgs      string
}

// testBootArgs: a small working set over two regions (split at 16 MiB of 32),
// fast enough that tests need little wall time.
const testBootArgs = "console=ttyS0 forkd.ws_mib=8 forkd.split_mib=16 forkd.rate=20000 forkd.write_pct=30 forkd.discard_pct=5"

// boot configures and starts a VM.
func (p *vmmProc) boot(b bootSpec) {
	p.t.Helper()
	kernel := filepath.Join(p.dir, "vmlinux")
	if _, err := os.Stat(kernel); err != nil {
		if err := os.WriteFile(kernel, []byte("not a kernel"), 0o644); err != nil {
			p.t.Fatal(err)
		}
	}
	machine := map[string]any{"vcpu_count": b.vcpus, "mem_size_mib": b.memMib, "track_dirty_pages": b.track}
	if b.huge {
		machine["huge_pages"] = "2M"
	}
	p.must("PUT", "/machine-config", machine, 204)
	p.must("PUT", "/boot-source", map[string]any{"kernel_image_path": kernel, "boot_args": b.bootArgs}, 204)
	p.must("PUT", "/actions", map[string]any{"action_type": "InstanceStart"}, 204)
}

func (p *vmmProc) pause() {
	p.t.Helper()
	p.must("PATCH", "/vm", map[string]any{"state": "Paused"}, 204)
}
func (p *vmmProc) resume() {
	p.t.Helper()
	p.must("PATCH", "/vm", map[string]any{"state": "Resumed"}, 204)
}

func (p *vmmProc) snapshot(typ, vmstate, mem string) {
	p.t.Helper()
	p.must("PUT", "/snapshot/create", map[string]any{"snapshot_type": typ, "snapshot_path": vmstate, "mem_file_path": mem}, 204)
}

func (p *vmmProc) loadFile(vmstate, mem string, track, resume bool) {
	p.t.Helper()
	p.must("PUT", "/snapshot/load", map[string]any{"snapshot_path": vmstate,
		"mem_backend":       map[string]any{"backend_type": "File", "backend_path": mem},
		"track_dirty_pages": track, "resume_vm": resume}, 204)
}

// requireClean fails the test if the workload saw any integrity error.
func requireClean(t testing.TB, name string, st GuestStats) {
	t.Helper()
	if st.IntegrityErrors != 0 || st.FirstIntegrityError != "" {
		t.Fatalf("%s: %d integrity errors, first: %s", name, st.IntegrityErrors, st.FirstIntegrityError)
	}
	if st.PagesVerified == 0 {
		t.Fatalf("%s: the workload verified no page (stats %+v)", name, st)
	}
}

// bootedSnapshot boots a VM, runs it, pauses it and writes a Full snapshot
// into dir; it returns the paused process and the files.
func bootedSnapshot(t *testing.T, dir string, b bootSpec, steps uint64) (p *vmmProc, vmstate, mem string) {
	t.Helper()
	p = startVMM(t, dir)
	p.boot(b)
	p.waitTicks(steps)
	p.pause()
	vmstate, mem = filepath.Join(dir, "base.vmstate"), filepath.Join(dir, "base.mem")
	p.snapshot("Full", vmstate, mem)
	return p, vmstate, mem
}
