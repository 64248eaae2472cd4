package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// recordingService is an api.Service for CLI tests: the CLI's job is to
// turn commands into the right API calls and print the answers, which this
// records. The real Service is the instance manager, tested in its package.
type recordingService struct {
	api.Service
	mu        sync.Mutex // guards forkNames, forkReqs, batches and instances
	forkNames []string   // every fork made, by either call
	forkReqs  []api.ForkRequest
	batches   []string // "instance|snapshot REF NAME COUNT TARGET BACKEND" per batch call
	instances []api.Instance
	forkErr   error
}

func (s *recordingService) ListInstances(context.Context) ([]api.Instance, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]api.Instance(nil), s.instances...), nil
}

func (s *recordingService) GetInstance(_ context.Context, ref string) (api.Instance, error) {
	return api.Instance{ID: "abcdef0123456789", Name: ref, State: api.StateStandby}, nil
}

func (s *recordingService) ForkInstance(_ context.Context, ref string, req api.ForkRequest) (api.Instance, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.forkErr != nil {
		return api.Instance{}, s.forkErr
	}
	s.forkReqs = append(s.forkReqs, req)
	return s.forked(req.Name), nil
}

// ForkSnapshot records a snapshot's fork as ForkInstance does.
func (s *recordingService) ForkSnapshot(ctx context.Context, ref string, req api.ForkRequest) (api.Instance, error) {
	return s.ForkInstance(ctx, ref, req)
}

// forked records a fork named name and returns it; s.mu is held.
func (s *recordingService) forked(name string) api.Instance {
	s.forkNames = append(s.forkNames, name)
	return api.Instance{ID: fmt.Sprintf("id%014d", len(s.forkNames)), Name: name, State: api.StateStandby,
		Vcpus: 1, MemoryMiB: 256, ForkMode: api.ForkModeHardlink, Source: "instance:abcdef0123456789", CreatedAt: time.Now()}
}

func (s *recordingService) batch(kind, ref string, req api.ForkBatchRequest) ([]api.Instance, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.batches = append(s.batches, fmt.Sprintf("%s %s %s %d %s %s", kind, ref, req.Name, req.Count, req.TargetState, req.RestoreBackend))
	if s.forkErr != nil {
		return nil, s.forkErr
	}
	var out []api.Instance
	for _, n := range req.Names() {
		out = append(out, s.forked(n))
	}
	return out, nil
}

func (s *recordingService) ForkInstanceBatch(_ context.Context, ref string, req api.ForkBatchRequest) ([]api.Instance, error) {
	return s.batch("instance", ref, req)
}

func (s *recordingService) ForkSnapshotBatch(_ context.Context, ref string, req api.ForkBatchRequest) ([]api.Instance, error) {
	return s.batch("snapshot", ref, req)
}

// serve runs svc behind the real handler on a Unix socket.
func serve(t *testing.T, svc api.Service) string {
	t.Helper()
	h, err := api.NewHandler(svc, api.HandlerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "forkd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

// run executes the CLI with args and returns stdout, stderr and exit code.
func run(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	root := NewRootCommand(Extensions{})
	var out, errb bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errb)
	root.SetArgs(args)
	code := Execute(context.Background(), root)
	return out.String(), errb.String(), code
}

func TestHelpListsEveryCommand(t *testing.T) {
	out, _, code := run(t, "--help")
	if code != 0 {
		t.Fatalf("--help exited %d", code)
	}
	for _, c := range []string{"run", "ps", "inspect", "pause", "resume", "standby", "restore", "stop", "start",
		"rm", "fork", "snapshot", "image", "pager", "demo", "completion"} { // bench: cmd/forkd mounts it (TestBinaryHelpAndDemo)
		if !strings.Contains(out, "\n  "+c+" ") {
			t.Errorf("forkd --help does not list %q", c)
		}
	}
	out, _, _ = run(t, "snapshot", "--help")
	for _, c := range []string{"create", "ls", "rm", "fork"} {
		if !strings.Contains(out, "\n  "+c+" ") {
			t.Errorf("forkd snapshot --help does not list %q", c)
		}
	}
}

// forkJSON is one result of `fork --count -o json`.
type forkJSON struct {
	Name     string        `json:"name"`
	Seconds  float64       `json:"latency_seconds"`
	Instance *api.Instance `json:"instance"`
	Error    string        `json:"error"`
	Retries  int           `json:"retries"`
}

// fork --count makes its forks with one batch call, never a fork call, and
// prints each fork's row with the call's latency, in name order.
func TestForkCountMakesOneBatchCall(t *testing.T) {
	svc := &recordingService{}
	sock := serve(t, svc)
	out, errOut, code := run(t, "--host", sock, "fork", "web", "burst", "--count", "4", "--target-state", "Running", "--restore-backend", "uffd")
	if code != 0 {
		t.Fatalf("exit %d, stderr %s", code, errOut)
	}
	if want := []string{"instance web burst 4 Running uffd"}; fmt.Sprint(svc.batches) != fmt.Sprint(want) || len(svc.forkReqs) != 0 {
		t.Errorf("batch calls %q and %d fork calls, want %q and none", svc.batches, len(svc.forkReqs), want)
	}
	if !strings.Contains(out, "4/4 forks in") || !strings.Contains(out, "(one batch call): p50") || strings.Count(out, "hardlink") != 4 {
		t.Errorf("output lacks one row per fork and a latency summary:\n%s", out)
	}
	rows := strings.Split(out, "\n")
	for i, n := range []string{"burst-1", "burst-2", "burst-3", "burst-4"} {
		if len(rows) <= i+1 || !strings.HasPrefix(rows[i+1], n+" ") {
			t.Errorf("row %d is not %s's:\n%s", i+1, n, out)
		}
	}

	svc.batches = nil
	out, _, code = run(t, "--host", sock, "-o", "json", "fork", "web", "j", "-n", "2")
	var results []forkJSON
	if code != 0 || json.Unmarshal([]byte(out), &results) != nil || len(results) != 2 || results[0].Instance == nil ||
		results[1].Name != "j-2" || results[0].Seconds != results[1].Seconds {
		t.Errorf("-o json fork --count 2: exit %d, output %s; want 2 results with the call's latency", code, out)
	}

	svc.batches = nil
	if _, errOut, code := run(t, "--host", sock, "snapshot", "fork", "base", "s", "--count", "3"); code != 0 ||
		fmt.Sprint(svc.batches) != "[snapshot base s 3  ]" {
		t.Errorf("snapshot fork --count 3: exit %d (%s), batch calls %q; want one snapshot batch", code, errOut, svc.batches)
	}
}

// --separate, and --from-running (a batch takes no live fork), make
// --count's forks with one fork call each.
func TestForkCountSeparateMakesOneCallPerFork(t *testing.T) {
	for _, tc := range []struct {
		args []string
		live bool
	}{
		{[]string{"fork", "web", "burst", "--count", "4", "--separate"}, false},
		{[]string{"fork", "web", "burst", "--count", "4", "--from-running"}, true},
		{[]string{"snapshot", "fork", "web", "burst", "--count", "4", "--separate"}, false},
	} {
		svc := &recordingService{}
		sock := serve(t, svc)
		out, errOut, code := run(t, append([]string{"--host", sock}, tc.args...)...)
		if code != 0 {
			t.Fatalf("%v: exit %d, stderr %s", tc.args, code, errOut)
		}
		sort.Strings(svc.forkNames)
		if want := []string{"burst-1", "burst-2", "burst-3", "burst-4"}; fmt.Sprint(svc.forkNames) != fmt.Sprint(want) ||
			len(svc.forkReqs) != 4 || len(svc.batches) != 0 {
			t.Errorf("%v: forks %v from %d fork calls and %d batch calls; want %v from 4 fork calls", tc.args, svc.forkNames,
				len(svc.forkReqs), len(svc.batches), want)
		}
		for _, r := range svc.forkReqs {
			if r.FromRunning != tc.live {
				t.Errorf("%v: fork %s from_running %v, want %v", tc.args, r.Name, r.FromRunning, tc.live)
			}
		}
		if !strings.Contains(out, "4/4 forks in") || strings.Contains(out, "batch") || strings.Count(out, "hardlink") != 4 {
			t.Errorf("%v: output lacks one row per fork and a latency summary:\n%s", tc.args, out)
		}
	}
	if _, errOut, code := run(t, "--host", "/nonexistent", "fork", "web", "x", "--separate"); code == 0 || !strings.Contains(errOut, "--count") {
		t.Errorf("--separate without --count: exit %d, %q; want a usage error naming --count", code, errOut)
	}
}

// A batch that fails made no fork: every row says failed, the error is said
// once, and the exit code is non-zero.
func TestForkBatchFailurePrintsEveryForkFailed(t *testing.T) {
	svc := &recordingService{forkErr: fmt.Errorf("a batch of 3 forks: fork %q: %w", "kid-2", api.ErrExists)}
	sock := serve(t, svc)
	out, errOut, code := run(t, "--host", sock, "fork", "web", "kid", "--count", "3")
	if code == 0 || strings.Count(out, "failed") != 3 || !strings.Contains(out, "0/3 forks") {
		t.Errorf("a failed batch: exit %d, output:\n%s", code, out)
	}
	if strings.Count(errOut, "already exists") != 1 || !strings.Contains(errOut, "kid-1..kid-3 (one batch, all or none)") {
		t.Errorf("a failed batch: stderr %q; want the batch's error once", errOut)
	}
	out, _, _ = run(t, "--host", sock, "-o", "json", "fork", "web", "kid", "--count", "3")
	var results []forkJSON
	if err := json.Unmarshal([]byte(out), &results); err != nil || len(results) != 3 || results[2].Instance != nil || results[2].Error == "" {
		t.Errorf("a failed batch -o json: %s; want 3 results with the error and no instance", out)
	}
}

func TestForkWithoutNameDerivesOneFromTheSource(t *testing.T) {
	svc := &recordingService{}
	sock := serve(t, svc)
	if _, errOut, code := run(t, "--host", sock, "fork", "web"); code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	if len(svc.forkNames) != 1 || !strings.HasPrefix(svc.forkNames[0], "web-fork-") {
		t.Errorf("fork names %v, want one starting web-fork-", svc.forkNames)
	}
}

func TestErrorsGoToStderrWithAHint(t *testing.T) {
	svc := &recordingService{forkErr: fmt.Errorf("fork web: instance is Running: %w", api.ErrInvalidState)}
	sock := serve(t, svc)
	cases := []struct {
		name     string
		args     []string
		wantErr  string
		wantHint string
	}{
		{"no daemon", []string{"--host", filepath.Join(t.TempDir(), "none.sock"), "ps"}, "cannot reach", "forkd serve"},
		{"fork of a running instance", []string{"--host", sock, "fork", "web", "x"}, "Running", "--from-running"},
		{"bad output format", []string{"--host", sock, "-o", "yaml", "ps"}, "table or json", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, errOut, code := run(t, tc.args...)
			if code == 0 {
				t.Fatalf("exit 0, want non-zero; stdout %s", out)
			}
			hintOK := tc.wantHint == "" || strings.Contains(errOut, "\nhint: ") && strings.Contains(errOut, tc.wantHint)
			if !strings.HasPrefix(errOut, "forkd: ") || !strings.Contains(errOut, tc.wantErr) || !hintOK {
				t.Errorf("stderr %q: want %q and hint %q", errOut, tc.wantErr, tc.wantHint)
			}
		})
	}
}

func TestPsPrintsTableAndJSON(t *testing.T) {
	svc := &recordingService{instances: []api.Instance{{ID: "0123456789abcdef", Name: "web", State: api.StateRunning,
		Vcpus: 2, MemoryMiB: 512, MemoryCheck: "ok", RestoreBackend: "file", CreatedAt: time.Now()}}}
	sock := serve(t, svc)
	out, _, code := run(t, "--host", sock, "ps")
	if code != 0 || !strings.Contains(out, "NAME") || !strings.Contains(out, "0123456789ab ") || !strings.Contains(out, "512 MiB") {
		t.Errorf("ps table (exit %d):\n%s", code, out)
	}
	out, _, code = run(t, "--host", sock, "ps", "-o", "json")
	var list []api.Instance
	if code != 0 || json.Unmarshal([]byte(out), &list) != nil || len(list) != 1 || list[0].Name != "web" {
		t.Errorf("ps -o json (exit %d): %s", code, out)
	}
}

// lifecycleService records actions, creates and snapshot calls.
type lifecycleService struct {
	recordingService
	calls []string
}

func (s *lifecycleService) CreateInstance(_ context.Context, req api.CreateInstanceRequest) (api.Instance, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = append(s.calls, fmt.Sprintf("create %s %d %d %v", req.Name, req.Vcpus, req.MemoryMiB, req.Start != nil && !*req.Start))
	return api.Instance{ID: "0123456789abcdef", Name: req.Name, State: api.StateRunning, Vcpus: req.Vcpus, MemoryMiB: req.MemoryMiB}, nil
}

func (s *lifecycleService) Action(_ context.Context, ref, action string, req api.ActionRequest) (api.Instance, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = append(s.calls, fmt.Sprintf("%s %s %s", action, ref, req.RestoreBackend))
	return api.Instance{ID: "0123456789abcdef", Name: ref, State: api.StateStandby, RestoreBackend: "uffd"}, nil
}

func (s *lifecycleService) DeleteInstance(_ context.Context, ref string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = append(s.calls, "delete "+ref)
	return nil
}

func (s *lifecycleService) CreateSnapshot(_ context.Context, ref string, req api.SnapshotRequest) (api.Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = append(s.calls, fmt.Sprintf("snapshot %s %s %s", ref, req.Name, req.Compression))
	return api.Snapshot{ID: "feedfacefeedface", Name: req.Name, Compression: "zstd", State: "compressing", SizeBytes: 64 << 20}, nil
}

func TestCommandsMakeTheRightCalls(t *testing.T) {
	svc := &lifecycleService{}
	sock := serve(t, svc)
	steps := []struct {
		args     []string
		wantCall string
		wantOut  string
	}{
		{[]string{"run", "web", "--vcpus", "2", "-m", "512"}, "create web 2 512 false", "created web (0123456789ab): Running"},
		{[]string{"run", "idle", "--no-start"}, "create idle 1 256 true", "created idle"},
		{[]string{"standby", "web"}, "standby web ", "web: Standby in"},
		{[]string{"restore", "web", "--restore-backend", "uffd"}, "restore web uffd", "(uffd backend)"},
		{[]string{"pause", "web"}, "pause web ", "web: Standby"},
		{[]string{"snapshot", "create", "web", "s1", "--compression", "zstd"}, "snapshot web s1 zstd", "snapshot s1 (feedfacefeed) of web: 64.0 MiB, compressing"},
		{[]string{"rm", "web"}, "delete web", "removed web"},
	}
	for _, s := range steps {
		svc.calls = nil
		out, errOut, code := run(t, append([]string{"--host", sock}, s.args...)...)
		if code != 0 {
			t.Errorf("forkd %v: exit %d: %s", s.args, code, errOut)
			continue
		}
		if len(svc.calls) != 1 || svc.calls[0] != s.wantCall {
			t.Errorf("forkd %v: calls %q, want [%q]", s.args, svc.calls, s.wantCall)
		}
		if !strings.Contains(out, s.wantOut) {
			t.Errorf("forkd %v: output %q, want it to contain %q", s.args, out, s.wantOut)
		}
	}
	out, _, code := run(t, "--host", sock, "-o", "json", "standby", "a", "b")
	var list []api.Instance
	if code != 0 || json.Unmarshal([]byte(out), &list) != nil || len(list) != 2 {
		t.Errorf("-o json standby a b: exit %d, output %s; want a JSON array of 2", code, out)
	}
}

// verbService answers ls, inspect and rm of every kind: an empty snapshot
// list, instances by name, and deletes that fail for refs named "missing".
type verbService struct {
	lifecycleService
}

func (s *verbService) ListSnapshots(context.Context) ([]api.Snapshot, error) { return nil, nil }

func (s *verbService) DeleteSnapshot(_ context.Context, ref string) error {
	return s.del("snapshot", ref)
}

func (s *verbService) DeleteImage(_ context.Context, ref string) error { return s.del("image", ref) }

func (s *verbService) DeleteInstance(_ context.Context, ref string) error {
	return s.del("instance", ref)
}

func (s *verbService) del(kind, ref string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = append(s.calls, "delete "+kind+" "+ref)
	if ref == "missing" {
		return fmt.Errorf("%s %q: %w", kind, ref, api.ErrNotFound)
	}
	return nil
}

// Every kind's ls, inspect and rm take the same shape: an empty list is []
// in JSON, inspect prints one object or an array of several, and rm goes on
// past a ref it cannot delete, prints each one it did and fails naming the
// others (with the kind's hint).
func TestListInspectAndRmOfEveryKind(t *testing.T) {
	svc := &verbService{}
	sock := serve(t, svc)
	if out, _, code := run(t, "--host", sock, "snapshot", "ls", "-o", "json"); code != 0 || strings.TrimSpace(out) != "[]" {
		t.Errorf("snapshot ls -o json with no snapshots: exit %d, %q; want []", code, out)
	}
	out, _, code := run(t, "--host", sock, "inspect", "web")
	var one api.Instance
	if code != 0 || json.Unmarshal([]byte(out), &one) != nil || one.Name != "web" {
		t.Errorf("inspect web: exit %d, %s; want the instance as an object", code, out)
	}
	out, _, code = run(t, "--host", sock, "inspect", "web", "db")
	var many []api.Instance
	if code != 0 || json.Unmarshal([]byte(out), &many) != nil || len(many) != 2 || many[1].Name != "db" {
		t.Errorf("inspect web db: exit %d, %s; want an array of both", code, out)
	}
	for _, c := range []struct {
		args       []string
		kind, hint string
	}{
		{[]string{"rm"}, "", "forkd ps"},
		{[]string{"snapshot", "rm"}, "snapshot ", "forkd snapshot ls"},
		{[]string{"image", "rm"}, "image ", "forkd image ls"},
	} {
		svc.calls = nil
		out, errOut, code := run(t, append(append([]string{"--host", sock}, c.args...), "a", "missing", "b")...)
		kind := strings.TrimSpace(c.kind)
		if kind == "" {
			kind = "instance"
		}
		wantCalls := []string{"delete " + kind + " a", "delete " + kind + " missing", "delete " + kind + " b"}
		if fmt.Sprint(svc.calls) != fmt.Sprint(wantCalls) {
			t.Errorf("%v a missing b: calls %q, want %q", c.args, svc.calls, wantCalls)
		}
		if want := "removed " + c.kind + "a\nremoved " + c.kind + "b\n"; out != want {
			t.Errorf("%v a missing b: output %q, want %q", c.args, out, want)
		}
		if code == 0 || !strings.Contains(errOut, c.kind+"rm missing:") || !strings.Contains(errOut, c.hint) {
			t.Errorf("%v a missing b: exit %d, stderr %q; want a failure naming %q with the hint %q", c.args, code, errOut, c.kind+"rm missing", c.hint)
		}
	}
}
