package api_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/api"
)

// newBatchSource returns a fake holding a Standby instance "src" and a
// snapshot "snap" of it, and a client that drives it over a Unix socket
// through the real handler.
func newBatchSource(t *testing.T) (*fakeService, *api.Client) {
	t.Helper()
	svc := newFakeService()
	h, err := api.NewHandler(svc, api.HandlerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := api.NewClient(serveUnix(t, h))
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if _, err := c.CreateInstance(ctx, api.CreateInstanceRequest{Name: "src", MemoryMiB: 256}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Action(ctx, "src", "standby", api.ActionRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "snap"}); err != nil {
		t.Fatal(err)
	}
	return svc, c
}

func names(list []api.Instance) []string {
	out := make([]string, len(list))
	for i, in := range list {
		out[i] = in.Name
	}
	return out
}

// POST /instances/{id}/forks and /snapshots/{id}/forks reach the batch
// methods (not the {action} route, nor the single fork's), once per batch,
// and answer 201 with every fork in name order.
func TestForkBatchAnswersEveryForkInNameOrder(t *testing.T) {
	svc, c := newBatchSource(t)
	ctx := t.Context()
	cases := []struct {
		what   string
		call   func(context.Context, string, api.ForkBatchRequest) ([]api.Instance, error)
		ref    string
		req    api.ForkBatchRequest
		state  string
		source string // the forks' source's prefix
	}{
		{"instance", c.ForkInstanceBatch, "src", api.ForkBatchRequest{Name: "kid", Count: 12}, api.StateStandby, "instance:"},
		{"instance, target state", c.ForkInstanceBatch, "src", api.ForkBatchRequest{Name: "run", Count: 3, TargetState: api.StateRunning, RestoreBackend: api.BackendUffd}, api.StateRunning, "instance:"},
		{"snapshot", c.ForkSnapshotBatch, "snap", api.ForkBatchRequest{Name: "s", Count: 1}, api.StateStandby, "snapshot:"},
	}
	for _, tc := range cases {
		t.Run(tc.what, func(t *testing.T) {
			before := svc.Calls()
			forks, err := tc.call(ctx, tc.ref, tc.req)
			if err != nil {
				t.Fatalf("a batch of %d: %v", tc.req.Count, err)
			}
			if got, want := fmt.Sprint(names(forks)), fmt.Sprint(tc.req.Names()); got != want {
				t.Errorf("forks %s, want %s in that order", got, want)
			}
			for _, f := range forks {
				if f.State != tc.state || f.ID == "" || !strings.HasPrefix(f.Source, tc.source) {
					t.Errorf("fork %+v: want state %s and a source %s...", f, tc.state, tc.source)
				}
			}
			if calls := svc.Calls() - before; calls != 1 {
				t.Errorf("the service saw %d calls for one batch, want 1", calls)
			}
		})
	}
	list, err := c.ListInstances(ctx)
	if err != nil || len(list) != 1+12+3+1 {
		t.Errorf("instances after the batches: %d (%v), want the source and 16 forks", len(list), err)
	}
}

// A batch is all or none: one name already taken is 409 and no fork of the
// batch exists afterwards.
func TestForkBatchWithATakenNameMakesNone(t *testing.T) {
	_, c := newBatchSource(t)
	ctx := t.Context()
	if _, err := c.ForkInstance(ctx, "src", api.ForkRequest{Name: "kid-3"}); err != nil {
		t.Fatal(err)
	}
	forks, err := c.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "kid", Count: 5})
	if !errors.Is(err, api.ErrExists) || len(forks) != 0 {
		t.Fatalf("a batch over a taken name: %v, %v; want ErrExists and no forks", names(forks), err)
	}
	list, _ := c.ListInstances(ctx)
	if got := names(list); fmt.Sprint(got) != "[src kid-3]" {
		t.Errorf("instances after a refused batch: %v, want [src kid-3]", got)
	}
}

// Bad batches are refused at the edge with a JSON error, and the service
// never sees them. Each row has a twin that differs in the one bad field
// and is accepted, so a row fails for its own reason.
func TestForkBatchRefusesBadRequests(t *testing.T) {
	// Names are at most 63 characters: with 58 of them, NAME-1000 just fits.
	long := strings.Repeat("a", 58)
	cases := []struct {
		name        string
		path        string
		body, twin  string
		status      int
		code        string
		contentType string
	}{
		{"count 0", "/instances/src/forks", `{"name":"a","count":0}`, `{"name":"a","count":1}`, 422, api.CodeInvalidRequest, ""},
		{"no count", "/instances/src/forks", `{"name":"a"}`, `{"name":"a","count":2}`, 422, api.CodeInvalidRequest, ""},
		{"negative count", "/snapshots/snap/forks", `{"name":"a","count":-1}`, `{"name":"a","count":1}`, 422, api.CodeInvalidRequest, ""},
		{"count past the limit", "/instances/src/forks", fmt.Sprintf(`{"name":"a","count":%d}`, api.MaxForkBatch+1),
			fmt.Sprintf(`{"name":"a","count":%d}`, api.MaxForkBatch), 422, api.CodeInvalidRequest, ""},
		{"count as a string", "/instances/src/forks", `{"name":"a","count":"3"}`, `{"name":"a","count":3}`, 400, api.CodeBadRequest, ""},
		{"a last name too long", "/instances/src/forks", `{"name":"` + long + `x","count":1000}`, `{"name":"` + long + `","count":1000}`, 422, api.CodeInvalidName, ""},
		{"a last name too long (snapshot)", "/snapshots/snap/forks", `{"name":"` + long + `xxx","count":10}`, `{"name":"` + long + `xx","count":10}`, 422, api.CodeInvalidName, ""},
		{"bad name", "/instances/src/forks", `{"name":"Kid","count":2}`, `{"name":"kid","count":2}`, 422, api.CodeInvalidName, ""},
		{"id-shaped name", "/instances/src/forks", `{"name":"0123456789abcdef01234567","count":2}`, `{"name":"0123456789abcdef0123456","count":2}`, 422, api.CodeInvalidName, ""},
		{"bad target_state", "/instances/src/forks", `{"name":"a","count":2,"target_state":"Paused"}`, `{"name":"a","count":2,"target_state":"Stopped"}`, 422, api.CodeInvalidRequest, ""},
		{"bad restore_backend", "/snapshots/snap/forks", `{"name":"a","count":2,"restore_backend":"nfs"}`, `{"name":"a","count":2,"restore_backend":"file"}`, 422, api.CodeInvalidRequest, ""},
		{"publish", "/instances/src/forks", `{"name":"a","count":2,"publish":[{"host_port":8080,"guest_port":80}]}`, `{"name":"a","count":2}`, 400, api.CodeBadRequest, ""},
		{"from_running", "/instances/src/forks", `{"name":"a","count":2,"from_running":true}`, `{"name":"a","count":2}`, 400, api.CodeBadRequest, ""},
		{"unknown field", "/snapshots/snap/forks", `{"name":"a","count":2,"colour":"blue"}`, `{"name":"a","count":2}`, 400, api.CodeBadRequest, ""},
		{"trailing data", "/instances/src/forks", `{"name":"a","count":2}{}`, `{"name":"a","count":2}`, 400, api.CodeBadRequest, ""},
		{"empty body", "/instances/src/forks", ``, `{"name":"a","count":2}`, 400, api.CodeBadRequest, ""},
		{"text body", "/instances/src/forks", `{"name":"a","count":2}`, `{"name":"a","count":2}`, 415, api.CodeUnsupportedMediaType, "text/plain"},
		{"bad ref", "/instances/..%2Fx/forks", `{"name":"a","count":2}`, ``, 422, api.CodeInvalidName, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			svc, _ := newBatchSource(t)
			srv := newTestServer(t, svc)
			post := func(body, ctype string) (int, api.Error) {
				t.Helper()
				if ctype == "" {
					ctype = "application/json"
				}
				resp, err := srv.Client().Post(srv.URL+tc.path, ctype, strings.NewReader(body))
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				raw, _ := io.ReadAll(resp.Body)
				var e api.Error
				if resp.StatusCode >= 300 {
					if err := json.Unmarshal(raw, &e); err != nil || e.Message == "" {
						t.Fatalf("%d body %q is not an error document", resp.StatusCode, raw)
					}
				}
				return resp.StatusCode, e
			}
			before := svc.Calls()
			status, e := post(tc.body, tc.contentType)
			if status != tc.status || e.Code != tc.code {
				t.Errorf("POST %s %s: %d %q (%s), want %d %q", tc.path, tc.body, status, e.Code, e.Message, tc.status, tc.code)
			}
			if calls := svc.Calls() - before; calls != 0 {
				t.Errorf("the service saw %d call(s) for a refused batch", calls)
			}
			if list, _ := svc.ListInstances(t.Context()); len(list) != 1 {
				t.Errorf("instances after a refused batch: %v, want only the source", names(list))
			}
			if tc.twin == "" {
				return
			}
			if status, e := post(tc.twin, ""); status != http.StatusCreated {
				t.Errorf("the twin POST %s %s: %d %s, want 201", tc.path, tc.twin, status, e.Message)
			}
		})
	}
}

// Another instance action is still an action, and one no route knows is
// still 404 naming the actions: the /forks route shadows nothing.
func TestForksRouteLeavesOtherActionsAlone(t *testing.T) {
	svc, c := newBatchSource(t)
	srv := newTestServer(t, svc)
	for _, tc := range []struct {
		method, path string
		status       int
		want         string
	}{
		{"POST", "/instances/src/fork-batch", 404, "no instance action"},
		{"POST", "/instances/src/forkss", 404, "no instance action"},
		{"POST", "/instances/src/forks/x", 404, "no such endpoint"},
		{"GET", "/instances/src/forks", 405, "POST"},
		{"GET", "/snapshots/snap/forks", 405, "POST"},
		{"POST", "/snapshots/snap/explode", 404, "no such endpoint"},
	} {
		req, _ := http.NewRequest(tc.method, srv.URL+tc.path, nil)
		resp, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status || !strings.Contains(string(raw), tc.want) {
			t.Errorf("%s %s: %d %s, want %d mentioning %q", tc.method, tc.path, resp.StatusCode, raw, tc.status, tc.want)
		}
	}
	if in, err := c.Action(t.Context(), "src", "restore", api.ActionRequest{}); err != nil || in.State != api.StateRunning {
		t.Errorf("restore after the /forks route exists: %+v, %v", in, err)
	}
}
