package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers/legacy"

	apispec "github.com/forkd/forkd/api"
	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/daemonproc"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/image/imagetest"
	"github.com/forkd/forkd/internal/instance"
	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/testenv"
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
	// Jailed (the default) with uids of its own, as every test daemon.
	testenv.NeedJail(t, jail.HostCgroups)
	daemon := exec.Command(bin, "serve", "--data-dir", data, "--vmm-binary", bin, "--log-level", "debug",
		"--jail-uid-range", testenv.JailUIDRange(data))
	daemon.Stdout, daemon.Stderr = logf, logf
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	pids := map[int]bool{}
	t.Cleanup(func() {
		daemon.Process.Signal(syscall.SIGTERM)
		daemon.Wait()
		// VMMs live on after the daemon by design; a jailed one's command
		// line names no path of the data dir (daemonproc finds it by its
		// root).
		for _, p := range daemonproc.ProcessesUnder(data) {
			if pids[p.Pid] {
				syscall.Kill(p.Pid, syscall.SIGKILL)
			}
		}
		// The daemon left its cgroups if a VMM outlived it.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		l, err := guestdir.New(data)
		if err == nil {
			err = instance.RemoveJailCgroups(ctx, l)
		}
		if err != nil {
			t.Errorf("cleanup: the daemon's jail cgroups: %v", err)
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

	// The event stream, open through everything below.
	evctx, stopEvents := context.WithCancel(ctx)
	evreq, _ := http.NewRequestWithContext(evctx, "GET", "http://localhost/events", nil)
	evresp, err := hc.Do(evreq)
	if err != nil || evresp.StatusCode != 200 || evresp.Header.Get("Content-Type") != api.ContentTypeNDJSON {
		t.Fatalf("GET /events: %v %v", evresp, err)
	}
	evLines := make(chan []string, 1)
	go func() {
		var lines []string
		sc := bufio.NewScanner(evresp.Body)
		for sc.Scan() {
			lines = append(lines, sc.Text())
		}
		evLines <- lines
	}()

	call("GET", "/health", "", 200)
	call("GET", "/instances", "", 200)
	call("GET", "/snapshots", "", 200)
	call("POST", "/instances", `{"name":"src","memory_mib":64,"kernel":"`+kernel+`","boot_args":"forkd.ws_mib=8 forkd.write_pct=20"}`, 201)
	call("POST", "/instances", `{"name":"idle","memory_mib":32,"kernel":"`+kernel+`","start":false}`, 201)
	// forkd wait, on the real daemon: 0 when it is in the state.
	if out, err := exec.Command(bin, "--host", sock, "wait", "src", "--state", "Running", "--timeout", "60s").CombinedOutput(); err != nil {
		t.Errorf("forkd wait src --state Running: %v\n%s", err, out)
	}
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
	// Batches: all or none, and never of a live source.
	var batch api.ForkBatch
	json.Unmarshal(call("POST", "/instances/src/forks", `{"name":"b","count":3}`, 201), &batch)
	if len(batch.Forks) != 3 || batch.Forks[0].Name != "b-1" || batch.Forks[2].Name != "b-3" {
		t.Errorf("a batch of 3: %+v, want b-1..b-3 in order", batch.Forks)
	}
	call("POST", "/instances/src/forks", `{"name":"b","count":4}`, 409)  // b-1..b-3 are taken
	call("GET", "/instances/b-4", "", 404)                               // so none was made
	call("POST", "/instances/live/forks", `{"name":"x","count":2}`, 409) // Running: forked live, one at a time
	call("POST", "/snapshots/snap1/forks", `{"name":"sb","count":2,"target_state":"Stopped"}`, 201)
	// forkd fork --count, on the real daemon: one batch call.
	if out, err := exec.Command(bin, "--host", sock, "fork", "src", "cb", "--count", "2").CombinedOutput(); err != nil ||
		!strings.Contains(string(out), "2/2 forks") || !strings.Contains(string(out), "(one batch call)") {
		t.Errorf("forkd fork src cb --count 2: %v\n%s", err, out)
	}
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
	for _, name := range []string{"live", "f1", "cold", "s1", "b-1", "b-2", "b-3", "sb-1", "sb-2", "cb-1", "cb-2", "idle", "src"} {
		call("DELETE", "/instances/"+name, "", 204)
	}
	call("GET", "/instances", "", 200)
	call("GET", "/metrics", "", 200)
	// forkd wait for a deleted instance: 2, it will never get there.
	cmd := exec.Command(bin, "--host", sock, "wait", "src", "--state", "Running", "--timeout", "60s")
	if out, err := cmd.CombinedOutput(); cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != 2 {
		t.Errorf("forkd wait for a deleted instance: %v, want exit 2\n%s", err, out)
	}
	checkEvents(t, doc, stopEvents, evLines)
	if os.Geteuid() == 0 { // building an image's root filesystem needs root
		imageCalls(t, bin, sock, call)
	}
}

// imageCalls pulls an image from an OCI layout through the real daemon
// (polling the pull as a client does), makes a VM of it, and checks the
// image endpoints' answers against the spec; then drives the same through
// the forkd CLI binary: pull with progress, run --image, image ls -o json,
// a refused rm with its hint, gc.
func imageCalls(t *testing.T, bin, sock string, call func(method, path, body string, want ...int) []byte) {
	layout := filepath.Join(t.TempDir(), "layout")
	imagetest.WriteLayout(t, layout, "v1", imagetest.Rich(t, 1<<20))
	ref := "oci:" + layout + ":v1"
	var p api.Pull
	json.Unmarshal(call("POST", "/images/pull", `{"ref":"`+ref+`"}`, 202), &p)
	for deadline := time.Now().Add(60 * time.Second); p.State == api.PullRunning; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("pull %s still running after 60 s: %+v", p.ID, p)
		}
		json.Unmarshal(call("GET", "/images/pulls/"+p.ID, "", 200), &p)
	}
	if p.State != api.PullSucceeded || p.Image == nil {
		t.Fatalf("pull ended %s: %+v", p.State, p.Error)
	}
	esc := url.PathEscape(ref)
	call("GET", "/images", "", 200)
	call("GET", "/images/"+esc, "", 200)
	call("GET", "/images/"+p.Image.Digest, "", 200)
	call("POST", "/instances", `{"name":"img","memory_mib":32,"image":"`+ref+`","disk_size_mib":512}`, 201)
	call("DELETE", "/images/"+esc, "", 409)
	call("POST", "/images/gc", "", 200)
	call("DELETE", "/instances/img", "", 204)
	call("DELETE", "/images/"+esc, "", 204)
	call("GET", "/images/"+esc, "", 404)
	var bad api.Pull
	json.Unmarshal(call("POST", "/images/pull", `{"ref":"oci:/nonexistent/forkd-layout"}`, 202), &bad)
	for deadline := time.Now().Add(30 * time.Second); bad.State == api.PullRunning && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		json.Unmarshal(call("GET", "/images/pulls/"+bad.ID, "", 200), &bad)
	}
	if bad.State != api.PullFailed || bad.Error == nil || bad.Error.Code != api.CodeNotFound {
		t.Errorf("pull of a missing layout: %+v, want failed with not_found", bad)
	}

	cli := func(wantOK bool, args ...string) (string, string) {
		t.Helper()
		var out, errb bytes.Buffer
		cmd := exec.Command(bin, append([]string{"--host", sock}, args...)...)
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		if (err == nil) != wantOK {
			t.Errorf("forkd %v: %v (want success %v)\nstdout: %s\nstderr: %s", args, err, wantOK, out.String(), errb.String())
		}
		return out.String(), errb.String()
	}
	_, progress := cli(true, "image", "pull", ref)
	for _, phase := range []string{"resolving", "done"} {
		if !strings.Contains(progress, phase) {
			t.Errorf("forkd image pull printed no %q progress line:\n%s", phase, progress)
		}
	}
	cli(true, "run", "img2", "--memory", "32", "--image", ref, "--disk-size", "512MiB")
	out, _ := cli(true, "image", "ls", "-o", "json")
	var list []api.Image
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list) != 1 || list[0].Digest == "" || len(list[0].Refs) == 0 || list[0].SizeBytes == 0 {
		t.Errorf("forkd image ls -o json: %v\n%s", err, out)
	}
	if _, stderr := cli(false, "image", "rm", ref); !strings.Contains(stderr, "instance img2") || !strings.Contains(stderr, "hint:") {
		t.Errorf("forkd image rm of an image in use says:\n%s", stderr)
	}
	cli(true, "rm", "img2")
	if out, _ := cli(true, "image", "gc"); !strings.Contains(out, "1 images removed") {
		t.Errorf("forkd image gc: %s", out)
	}
}

// checkEvents ends the event stream and checks what it carried: every line
// is an Event as the spec says, and the run's milestones are there.
func checkEvents(t *testing.T, doc *openapi3.T, stop func(), lines <-chan []string) {
	t.Helper()
	stop()
	schema := doc.Components.Schemas["Event"].Value
	seen := map[string]bool{}
	for _, line := range <-lines {
		var v any
		if err := json.Unmarshal([]byte(line), &v); err != nil {
			t.Errorf("GET /events: a line that is not JSON: %q", line)
			continue
		}
		if err := schema.VisitJSON(v); err != nil {
			t.Errorf("GET /events: %s does not conform to the spec: %v", line, err)
		}
		var ev api.Event
		json.Unmarshal([]byte(line), &ev)
		name := ""
		if ev.Instance != nil {
			name = ev.Instance.Name
		} else if ev.Snapshot != nil {
			name = ev.Snapshot.Name
		}
		seen[ev.Type+" "+name+" "+ev.State] = true
	}
	for _, want := range []string{
		"instance.created src Created", "instance.state src Running", "instance.created idle Created",
		"snapshot.created snap1 ready", "instance.forked live Standby", "instance.state live Running", "instance.state src Standby",
		"instance.forked f1 Standby", "instance.forked cold Standby", "instance.state cold Stopped", "instance.state f1 Running",
		"instance.forked b-1 Standby", "instance.forked b-3 Standby", "instance.state sb-2 Stopped",
		"snapshot.deleted snap1 ", "instance.deleted src ",
	} {
		if !seen[want] {
			t.Errorf("GET /events did not carry %q; it carried %v", want, seen)
		}
	}
}
