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
	mu        sync.Mutex // guards forkNames and instances
	forkNames []string
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
	s.forkNames = append(s.forkNames, req.Name)
	return api.Instance{ID: fmt.Sprintf("id%014d", len(s.forkNames)), Name: req.Name, State: api.StateStandby,
		Vcpus: 1, MemoryMiB: 256, ForkMode: api.ForkModeHardlink, Source: "instance:abcdef0123456789", CreatedAt: time.Now()}, nil
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

func TestForkCountMakesNamedConcurrentForksAndPrintsLatencies(t *testing.T) {
	svc := &recordingService{}
	sock := serve(t, svc)
	out, errOut, code := run(t, "--host", sock, "fork", "web", "burst", "--count", "4")
	if code != 0 {
		t.Fatalf("exit %d, stderr %s", code, errOut)
	}
	sort.Strings(svc.forkNames)
	if want := []string{"burst-1", "burst-2", "burst-3", "burst-4"}; fmt.Sprint(svc.forkNames) != fmt.Sprint(want) {
		t.Errorf("fork names %v, want %v", svc.forkNames, want)
	}
	if !strings.Contains(out, "4/4 forks in") || !strings.Contains(out, "p50") || strings.Count(out, "hardlink") != 4 {
		t.Errorf("output lacks one row per fork and a latency summary:\n%s", out)
	}

	out, _, code = run(t, "--host", sock, "-o", "json", "fork", "web", "j", "-n", "2")
	var results []struct {
		Name     string        `json:"name"`
		Seconds  float64       `json:"latency_seconds"`
		Instance *api.Instance `json:"instance"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &results) != nil || len(results) != 2 || results[0].Instance == nil {
		t.Errorf("-o json fork --count 2: exit %d, output %s", code, out)
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
