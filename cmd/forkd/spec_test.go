package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers/legacy"

	apispec "github.com/forkd/forkd/api"
	"github.com/forkd/forkd/internal/api"
)

// TestRealDaemonResponsesConformToSpec runs the real daemon (instance
// manager, emulator VMMs) and validates every response it gives against
// api/openapi.yaml: the handlers' conformance test uses an in-memory
// Service, this one checks what the manager really returns.
func TestRealDaemonResponsesConformToSpec(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and boots emulator VMs; skipped with -short")
	}
	bin := buildForkd(t)
	// A short dir: socket paths under it must fit the kernel's 108 bytes.
	dir, err := os.MkdirTemp("", "fd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	data := filepath.Join(dir, "data")
	kernel := filepath.Join(dir, "vmlinux")
	os.WriteFile(kernel, []byte("placeholder"), 0o600)

	logf, _ := os.Create(filepath.Join(dir, "daemon.log"))
	defer logf.Close()
	daemon := exec.Command(bin, "serve", "--data-dir", data, "--vmm-binary", bin, "--log-level", "debug")
	daemon.Stdout, daemon.Stderr = logf, logf
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	pids := map[int]bool{}
	t.Cleanup(func() {
		daemon.Process.Signal(syscall.SIGTERM)
		daemon.Wait()
		for pid := range pids { // VMMs live on after the daemon by design
			if b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline"); err == nil && strings.Contains(string(b), dir) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "daemon.log"))
			t.Logf("daemon log:\n%s", b)
		}
	})

	sock := filepath.Join(data, api.SocketName)
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := hc.Get("http://forkd/health")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not answer: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}

	ctx := context.Background()
	doc, err := openapi3.NewLoader().LoadFromData([]byte(apispec.OpenAPI))
	if err != nil {
		t.Fatal(err)
	}
	router, err := legacy.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	call := func(method, path, body string, want ...int) []byte {
		t.Helper()
		req, _ := http.NewRequest(method, "http://localhost"+path, strings.NewReader(body))
		if body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		ok := false
		for _, w := range want {
			ok = ok || resp.StatusCode == w
		}
		if !ok {
			t.Errorf("%s %s: status %d, want %v; body %s", method, path, resp.StatusCode, want, b)
		}
		var inst api.Instance
		if json.Unmarshal(b, &inst) == nil && inst.Pid > 0 {
			pids[inst.Pid] = true
		}
		specReq, _ := http.NewRequest(method, "http://localhost"+path, strings.NewReader(body))
		specReq.Header = req.Header
		route, params, err := router.FindRoute(specReq)
		if err != nil {
			t.Fatalf("%s %s: not in the spec: %v", method, path, err)
		}
		in := &openapi3filter.ResponseValidationInput{
			RequestValidationInput: &openapi3filter.RequestValidationInput{Request: specReq, PathParams: params, Route: route},
			Status:                 resp.StatusCode, Header: resp.Header, Body: io.NopCloser(bytes.NewReader(b)),
			Options: &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true},
		}
		if err := openapi3filter.ValidateResponse(ctx, in); err != nil {
			t.Errorf("%s %s → %d does not conform to api/openapi.yaml: %v\nbody: %s", method, path, resp.StatusCode, err, b)
		}
		return b
	}

	call("GET", "/health", "", 200)
	call("GET", "/instances", "", 200)
	call("GET", "/snapshots", "", 200)
	call("POST", "/instances", `{"name":"src","memory_mib":64,"kernel":"`+kernel+`","boot_args":"forkd.ws_mib=8 forkd.write_pct=20"}`, 201)
	call("POST", "/instances", `{"name":"idle","memory_mib":32,"kernel":"`+kernel+`","start":false}`, 201)
	call("GET", "/instances/src", "", 200)
	call("GET", "/instances", "", 200)
	call("POST", "/instances/src/pause", "", 200)
	call("POST", "/instances/src/resume", "", 200)
	call("POST", "/instances/src/snapshots", `{"name":"snap1"}`, 201)
	call("POST", "/instances/src/fork", `{"name":"live","from_running":true}`, 201)
	call("POST", "/instances/src/fork", `{"name":"refused"}`, 409) // Running without from_running
	call("POST", "/instances/src/standby", "", 200)
	call("POST", "/instances/src/fork", `{"name":"f1"}`, 201)
	call("POST", "/instances/src/fork", `{"name":"cold","target_state":"Stopped"}`, 201)
	call("POST", "/instances/src/snapshots", `{"name":"snapz","compression":"zstd"}`, 201)
	call("GET", "/snapshots", "", 200)
	call("GET", "/snapshots/snap1", "", 200)
	call("POST", "/snapshots/snap1/fork", `{"name":"s1","target_state":"Running"}`, 201)
	call("POST", "/instances/f1/restore", "", 200)
	call("POST", "/instances/f1/resume", "", 409)
	call("POST", "/instances/f1/stop", "", 200)
	call("POST", "/instances/idle/start", "", 200)
	call("POST", "/instances", `{"name":"src"}`, 409)
	call("GET", "/instances/nope", "", 404)
	call("GET", "/pager/stats", "", 200, 503)
	call("DELETE", "/snapshots/snap1", "", 204)
	call("GET", "/snapshots/snapz", "", 200)
	call("DELETE", "/snapshots/snapz", "", 204, 409)
	call("GET", "/snapshots/snap1", "", 404)
	for _, name := range []string{"live", "f1", "cold", "s1", "idle", "src"} {
		call("DELETE", "/instances/"+name, "", 204)
	}
	call("GET", "/instances", "", 200)
	call("GET", "/metrics", "", 200)
}
