package reliability

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
)

// rawResponse sends one request exactly as written (no client-side path
// cleaning or escaping) over the daemon's socket and returns the response
// status and body.
func rawRequest(t *testing.T, sock, method, path string, header map[string]string, body string) (int, http.Header, []byte) {
	t.Helper()
	conn, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(60 * time.Second))
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: forkd\r\nConnection: close\r\n", method, path)
	for k, v := range header {
		fmt.Fprintf(&b, "%s: %s\r\n", k, v)
	}
	if body != "" {
		fmt.Fprintf(&b, "Content-Length: %d\r\n", len(body))
	}
	b.WriteString("\r\n")
	b.WriteString(body)
	// A server may answer (413, say) and close before it read everything:
	// a failed write is fine as long as a response comes back.
	_, werr := io.WriteString(conn, b.String())
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("%s %s: read response: %v (write: %v)", method, path, err, werr)
	}
	defer resp.Body.Close()
	rb, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, rb
}

// fingerprint is what a refused request must not change: the instances and
// snapshots (id, name, state) and every path under the data dir and its
// parent (a traversal would create a file there).
func fingerprint(t *testing.T, d *Daemon) string {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	var lines []string
	insts, err := d.Client.ListInstances(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range insts {
		lines = append(lines, fmt.Sprintf("instance %s %s %s", in.ID, in.Name, in.State))
	}
	snaps, err := d.Client.ListSnapshots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range snaps {
		lines = append(lines, fmt.Sprintf("snapshot %s %s %s", s.ID, s.Name, s.State))
	}
	parent := filepath.Dir(d.Layout.Root())
	filepath.WalkDir(parent, func(p string, de fs.DirEntry, err error) error {
		if _, pooled := guestdir.PooledID(de.Name()); err == nil && pooled && de.IsDir() {
			// The daemon's empty fork trees made ahead: scratch it takes
			// and refills between calls, no VM's (a refused fork that took
			// one leaves none behind: instance's TestRefusedForksLeaveNoTree).
			return fs.SkipDir
		}
		if err == nil && !strings.HasPrefix(de.Name(), "forkd.db") && de.Name() != "daemon.log" {
			lines = append(lines, "path "+p)
		}
		return nil
	})
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// TestHostileRequestsGetAClear4xxAndChangeNothing sends a catalogue of
// hostile or malformed requests to a real daemon (path traversal in ids and
// names, absolute paths, huge and negative sizes, wrong types and content
// types, oversized bodies and headers, wrong methods, wrong states, missing
// refs). Each must get a 4xx with a JSON {code, message} (dot-segment paths
// may instead be redirected to their clean form, which names nothing) and
// leave the instances, snapshots and files exactly as they were.
func TestHostileRequestsGetAClear4xxAndChangeNothing(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil)
	createStandby(t, d.Client, "src")
	createRunning(t, d.Client, "run")
	if _, err := d.Client.CreateSnapshot(ctxT(t, 30*time.Second), "src", api.SnapshotRequest{Name: "snap"}); err != nil {
		t.Fatal(err)
	}
	outside := filepath.Join(filepath.Dir(d.Layout.Root()), "escaped")
	long := strings.Repeat("a", 5000)
	type tc struct {
		name, method, path, ctype, body string
		want                            int // 0: any 4xx
		redirectOK                      bool
	}
	cases := []tc{
		// Path traversal and absolute paths in ids.
		{"encoded traversal id", "GET", "/instances/..%2F..%2Fetc%2Fpasswd", "", "", 422, false},
		{"encoded absolute id", "GET", "/instances/%2Fetc%2Fpasswd", "", "", 422, false},
		{"encoded dot-dot id", "DELETE", "/instances/%2E%2E", "", "", 422, false},
		{"traversal delete", "DELETE", "/instances/..%2Fsrc", "", "", 422, false},
		{"traversal snapshot delete", "DELETE", "/snapshots/..%2F..%2Fguests", "", "", 422, false},
		{"traversal fork source", "POST", "/instances/..%2F..%2Ftmp/fork", "", `{"name":"x"}`, 422, false},
		{"traversal snapshot fork", "POST", "/snapshots/%2E%2E%2Fsnap/fork", "", `{"name":"x"}`, 422, false},
		{"raw dot segments", "DELETE", "/instances/../snapshots/snap", "", "", 0, true},
		{"raw dot segments in action", "POST", "/instances/src/../run/stop", "", "", 0, true},
		{"nul in id", "GET", "/instances/src%00", "", "", 0, false},
		{"newline in id", "GET", "/instances/src%0a", "", "", 0, false},
		// Path traversal and absolute paths in names.
		{"traversal name", "POST", "/instances", "", `{"name":"../escaped"}`, 422, false},
		{"absolute name", "POST", "/instances", "", `{"name":"` + outside + `"}`, 422, false},
		{"encoded traversal name", "POST", "/instances/src/fork", "", `{"name":"..%2Fescaped"}`, 422, false},
		{"traversal snapshot name", "POST", "/instances/src/snapshots", "", `{"name":"../../escaped"}`, 422, false},
		{"nul in name", "POST", "/instances", "", `{"name":"a\u0000b"}`, 422, false},
		{"dot name", "POST", "/instances/src/fork", "", `{"name":"."}`, 422, false},
		{"unicode slash name", "POST", "/instances", "", `{"name":"a\u2215b"}`, 422, false},
		// Sizes.
		{"negative memory", "POST", "/instances", "", `{"name":"a","memory_mib":-1}`, 422, false},
		{"huge memory", "POST", "/instances", "", `{"name":"a","memory_mib":4611686018427387904}`, 422, false},
		{"overflowing memory", "POST", "/instances", "", `{"name":"a","memory_mib":99999999999999999999999}`, 400, false},
		{"fractional memory", "POST", "/instances", "", `{"name":"a","memory_mib":1.5}`, 400, false},
		{"negative vcpus", "POST", "/instances", "", `{"name":"a","vcpus":-4}`, 422, false},
		{"huge vcpus", "POST", "/instances", "", `{"name":"a","vcpus":1000000000}`, 422, false},
		{"long boot args", "POST", "/instances", "", `{"name":"a","boot_args":"` + long + `"}`, 422, false},
		{"long kernel path", "POST", "/instances", "", `{"name":"a","kernel":"/` + long + `"}`, 422, false},
		{"missing kernel", "POST", "/instances", "", `{"name":"a","kernel":"/nonexistent/vmlinux"}`, 422, false},
		{"dir as rootfs", "POST", "/instances", "", `{"name":"a","rootfs":"/etc"}`, 422, false},
		{"oversized body", "POST", "/instances", "", `{"name":"a","boot_args":"` + strings.Repeat("b", 2<<20) + `"}`, 413, false},
		// Types and content types.
		{"text/plain", "POST", "/instances", "text/plain", `{"name":"a"}`, 415, false},
		{"no content type", "POST", "/instances", "-", `{"name":"a"}`, 415, false},
		{"form", "POST", "/instances/src/fork", "application/x-www-form-urlencoded", `name=a`, 415, false},
		{"multipart", "POST", "/instances", "multipart/form-data; boundary=x", "--x\r\n\r\n{}\r\n--x--", 415, false},
		{"xml", "POST", "/instances/src/snapshots", "application/xml", `<name>a</name>`, 415, false},
		{"string for int", "POST", "/instances", "", `{"name":"a","vcpus":"2"}`, 400, false},
		{"array body", "POST", "/instances", "", `[{"name":"a"}]`, 400, false},
		{"null body", "POST", "/instances", "", `null`, 0, false},
		{"unknown field", "POST", "/instances/src/fork", "", `{"name":"a","force":true}`, 400, false},
		{"trailing JSON", "POST", "/instances", "", `{"name":"a"}{"name":"b"}`, 400, false},
		{"truncated JSON", "POST", "/instances", "", `{"name":"a"`, 400, false},
		{"invalid UTF-8", "POST", "/instances", "", "{\"name\":\"a\xff\"}", 0, false},
		{"deep nesting", "POST", "/instances", "", strings.Repeat("[", 100000) + strings.Repeat("]", 100000), 400, false},
		// Methods, routes, states, refs.
		{"PUT collection", "PUT", "/instances", "", `{"name":"a"}`, 405, false},
		{"PATCH instance", "PATCH", "/instances/src", "", `{"name":"b"}`, 405, false},
		{"unknown action", "POST", "/instances/src/explode", "", "", 404, false},
		{"unknown route", "GET", "/etc/passwd", "", "", 404, false},
		{"pause a Standby instance", "POST", "/instances/src/pause", "", "", 409, false},
		{"start a Standby instance", "POST", "/instances/src/start", "", "", 409, false},
		{"fork Running without from_running", "POST", "/instances/run/fork", "", `{"name":"a"}`, 409, false},
		{"fork to Paused", "POST", "/instances/src/fork", "", `{"name":"a","target_state":"Paused"}`, 422, false},
		{"fork name taken", "POST", "/instances/src/fork", "", `{"name":"run"}`, 409, false},
		{"snapshot name taken", "POST", "/instances/src/snapshots", "", `{"name":"snap"}`, 409, false},
		{"bad restore backend", "POST", "/instances/src/restore", "", `{"restore_backend":"../x"}`, 422, false},
		{"bad compression", "POST", "/instances/src/snapshots", "", `{"name":"s2","compression":"../x"}`, 422, false},
		{"missing instance", "DELETE", "/instances/nope", "", "", 404, false},
		{"missing snapshot fork", "POST", "/snapshots/nope/fork", "", `{"name":"a"}`, 404, false},
		{"ambiguous-free prefix miss", "GET", "/instances/zzzz", "", "", 404, false},
	}
	sock := d.Layout.Socket()
	before := fingerprint(t, d)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			hdr := map[string]string{}
			switch c.ctype {
			case "":
				if c.body != "" {
					hdr["Content-Type"] = "application/json"
				}
			case "-":
			default:
				hdr["Content-Type"] = c.ctype
			}
			status, h, body := rawRequest(t, sock, c.method, c.path, hdr, c.body)
			addFigure("hostile_requests", 1)
			switch {
			case c.redirectOK && status >= 300 && status < 400:
			case status < 400 || status >= 500:
				t.Fatalf("%s %s: status %d, want a 4xx; body %s", c.method, c.path, status, trim(body))
			case c.want != 0 && status != c.want:
				t.Errorf("%s %s: status %d, want %d; body %s", c.method, c.path, status, c.want, trim(body))
			}
			if status >= 400 {
				var e api.Error
				if err := json.Unmarshal(body, &e); err != nil || e.Code == "" || e.Message == "" {
					t.Errorf("%s %s: %d body is not a JSON {code, message}: %s (content-type %q)", c.method, c.path, status, trim(body), h.Get("Content-Type"))
				}
			}
			if after := fingerprint(t, d); after != before {
				t.Fatalf("%s %s changed something:\nbefore:\n%s\nafter:\n%s", c.method, c.path, before, after)
			}
		})
	}
	if _, err := os.Stat(outside); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s exists: a name escaped the data dir", outside)
	}
	checkAll(t, d)
}

func trim(b []byte) string {
	if len(b) > 300 {
		return string(b[:300]) + "..."
	}
	return string(b)
}

// TestConcurrentDeletesOfOneIDSucceedExactlyOnce races 8 deletes of one
// instance and of one snapshot: exactly one 204, the rest 404, nothing else.
func TestConcurrentDeletesOfOneIDSucceedExactlyOnce(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil)
	src := createStandby(t, d.Client, "src")
	for round := 0; round < 3; round++ {
		kid, err := d.Client.ForkInstance(ctxT(t, 30*time.Second), "src", api.ForkRequest{Name: fmt.Sprintf("kid-%d", round)})
		if err != nil {
			t.Fatal(err)
		}
		snap, err := d.Client.CreateSnapshot(ctxT(t, 30*time.Second), "src", api.SnapshotRequest{Name: fmt.Sprintf("snap-%d", round)})
		if err != nil {
			t.Fatal(err)
		}
		for _, target := range []struct {
			kind string
			del  func(ctx context.Context) error
		}{
			{"instance", func(ctx context.Context) error { return d.Client.DeleteInstance(ctx, kid.ID) }},
			{"snapshot", func(ctx context.Context) error { return d.Client.DeleteSnapshot(ctx, snap.ID) }},
		} {
			var wg sync.WaitGroup
			var mu sync.Mutex
			ok, notFound := 0, 0
			var others []error
			start := make(chan struct{})
			for i := 0; i < 8; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					err := target.del(context.Background())
					mu.Lock()
					defer mu.Unlock()
					addFigure("concurrent_deletes", 1)
					switch {
					case err == nil:
						ok++
					case errors.Is(err, api.ErrNotFound):
						notFound++
					default:
						others = append(others, err)
					}
				}()
			}
			close(start)
			wg.Wait()
			if ok != 1 || notFound != 7 || len(others) != 0 {
				t.Errorf("round %d, 8 concurrent deletes of one %s: %d succeeded, %d not found, others %v; want 1 and 7", round, target.kind, ok, notFound, others)
			}
		}
	}
	if in, err := d.Client.GetInstance(ctxT(t, 5*time.Second), src.ID); err != nil || in.State != api.StateStandby {
		t.Errorf("source after the deletes of its forks and snapshots: %+v, %v", in, err)
	}
	checkAll(t, d)
	if _, err := Exercise(ctxT(t, 60*time.Second), d.Client); err != nil {
		t.Error(err)
	}
}
