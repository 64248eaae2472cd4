package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/legacy"
	"github.com/prometheus/client_golang/prometheus"

	apispec "github.com/forkd/forkd/api"
	"github.com/forkd/forkd/internal/api"
)

// specChecker validates live requests and responses against api/openapi.yaml
// and records which operations and statuses were exercised.
type specChecker struct {
	t       *testing.T
	doc     *openapi3.T
	router  routers.Router
	covered map[string]map[int]bool // "METHOD /spec/path" → statuses seen
	// report receives each conformance failure; t.Errorf unless a test
	// wants to see the failures itself.
	report func(error)
}

func newSpecChecker(t *testing.T) *specChecker {
	t.Helper()
	ctx := context.Background()
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromData([]byte(apispec.OpenAPI))
	if err != nil {
		t.Fatalf("load api/openapi.yaml: %v", err)
	}
	if err := doc.Validate(ctx); err != nil {
		t.Fatalf("api/openapi.yaml is not a valid OpenAPI document: %v", err)
	}
	router, err := legacy.NewRouter(doc)
	if err != nil {
		t.Fatalf("route api/openapi.yaml: %v", err)
	}
	return &specChecker{t: t, doc: doc, router: router, covered: map[string]map[int]bool{},
		report: func(err error) { t.Helper(); t.Error(err) }}
}

// call sends one request to srv and checks both sides against the spec:
// the request when it is meant to be valid, the response always.
func (c *specChecker) call(srv *httptest.Server, method, path, body string, wantStatus int) []byte {
	c.t.Helper()
	ctx := context.Background()
	req, err := http.NewRequestWithContext(ctx, method, srv.URL+path, strings.NewReader(body))
	if err != nil {
		c.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	respBody, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != wantStatus {
		c.t.Fatalf("%s %s: status %d, want %d; body %s", method, path, resp.StatusCode, wantStatus, respBody)
	}

	// Route against the spec's server URL, not the test server's.
	specReq, _ := http.NewRequestWithContext(ctx, method, "http://localhost"+path, strings.NewReader(body))
	specReq.Header = req.Header.Clone()
	route, params, err := c.router.FindRoute(specReq)
	if err != nil {
		c.t.Fatalf("%s %s: not in api/openapi.yaml: %v", method, path, err)
	}
	reqIn := &openapi3filter.RequestValidationInput{
		Request: specReq, PathParams: params, Route: route,
		Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc, MultiError: true},
	}
	if wantStatus < 300 {
		if err := openapi3filter.ValidateRequest(ctx, reqIn); err != nil {
			c.report(fmt.Errorf("%s %s: request does not conform to the spec: %w", method, path, err))
		}
	}
	respIn := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: reqIn,
		Status:                 resp.StatusCode,
		Header:                 resp.Header,
		Body:                   io.NopCloser(bytes.NewReader(respBody)),
		Options:                &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true},
	}
	if err := openapi3filter.ValidateResponse(ctx, respIn); err != nil {
		c.report(fmt.Errorf("%s %s → %d: response does not conform to the spec: %w\nbody: %s", method, path, resp.StatusCode, err, respBody))
	}
	key := method + " " + route.Path
	if c.covered[key] == nil {
		c.covered[key] = map[int]bool{}
	}
	c.covered[key][resp.StatusCode] = true
	return respBody
}

// events reads GET /events as NDJSON and as SSE and checks every event
// against the spec's Event schema (a stream has no one body to validate).
func (c *specChecker) events(srv *httptest.Server) {
	c.t.Helper()
	schema := c.doc.Components.Schemas["Event"].Value
	for _, accept := range []string{"", api.ContentTypeSSE} {
		req, _ := http.NewRequest(http.MethodGet, srv.URL+"/events", nil)
		if accept != "" {
			req.Header.Set("Accept", accept)
		}
		resp, err := srv.Client().Do(req)
		if err != nil {
			c.t.Fatalf("GET /events: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		want := api.ContentTypeNDJSON
		if accept != "" {
			want = accept
		}
		if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != want {
			c.t.Fatalf("GET /events (Accept %q): %d %s %s, want 200 %s", accept, resp.StatusCode, resp.Header.Get("Content-Type"), body, want)
		}
		n := 0
		for _, line := range strings.Split(string(body), "\n") {
			if accept != "" {
				var ok bool
				if line, ok = strings.CutPrefix(line, "data: "); !ok {
					continue
				}
			}
			if strings.TrimSpace(line) == "" {
				continue
			}
			var v any
			if err := json.Unmarshal([]byte(line), &v); err != nil {
				c.report(fmt.Errorf("GET /events (Accept %q): a line that is not JSON: %q", accept, line))
				continue
			}
			if err := schema.VisitJSON(v); err != nil {
				c.report(fmt.Errorf("GET /events (Accept %q): event %s does not conform to the spec: %w", accept, line, err))
			}
			n++
		}
		if n == 0 {
			c.t.Errorf("GET /events (Accept %q) streamed no event; want the fake's", accept)
		}
	}
	if c.covered["GET /events"] == nil {
		c.covered["GET /events"] = map[int]bool{}
	}
	c.covered["GET /events"][200] = true
}

func newTestServer(t *testing.T, svc api.Service) *httptest.Server {
	t.Helper()
	reg := prometheus.NewRegistry()
	h, err := api.NewHandler(svc, api.HandlerOptions{Registerer: reg, Gatherer: reg})
	if err != nil {
		t.Fatalf("NewHandler: %v", err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

func TestResponsesConformToOpenAPISpec(t *testing.T) {
	c := newSpecChecker(t)
	srv := newTestServer(t, newFakeService())

	steps := []struct {
		method, path, body string
		status             int
	}{
		{"GET", "/health", "", 200},
		{"GET", "/openapi.yaml", "", 200},
		{"GET", "/instances", "", 200},
		{"GET", "/snapshots", "", 200},
		{"POST", "/instances", `{"name":"web","vcpus":2,"memory_mib":512,"kernel":"/k","boot_args":"forkd.ws_mib=8"}`, 201},
		{"POST", "/instances", `{"name":"idle","start":false}`, 201},
		{"GET", "/instances", "", 200},
		{"GET", "/instances/web", "", 200},
		{"POST", "/instances/idle/start", "", 200},
		{"POST", "/instances/web/pause", "", 200},
		{"POST", "/instances/web/resume", "{}", 200},
		{"POST", "/instances/web/standby", "", 200},
		{"POST", "/instances/web/restore", `{"restore_backend":"uffd"}`, 200},
		{"POST", "/instances/web/standby", "", 200},
		{"POST", "/instances/web/fork", `{"name":"web-1"}`, 201},
		{"POST", "/instances/web/forks", `{"name":"kid","count":3}`, 201},
		{"POST", "/instances/web/forks", `{"name":"run","count":2,"target_state":"Running","restore_backend":"uffd"}`, 201},
		{"POST", "/instances/idle/fork", `{"name":"live-1","from_running":true,"target_state":"Running"}`, 201},
		{"POST", "/instances/web/snapshots", `{"name":"snap1","compression":"zstd"}`, 201},
		{"GET", "/snapshots", "", 200},
		{"GET", "/snapshots/snap1", "", 200},
		{"POST", "/snapshots/snap1/fork", `{"name":"from-snap","target_state":"Running","restore_backend":"uffd"}`, 201},
		{"POST", "/snapshots/snap1/forks", `{"name":"snap-kid","count":2}`, 201},
		{"GET", "/pager/stats", "", 200},
		{"POST", "/instances/web/stop", "", 200},
		{"DELETE", "/snapshots/snap1", "", 204},
		{"DELETE", "/instances/web", "", 204},
		{"GET", "/metrics", "", 200},

		{"POST", "/images/pull", `{"ref":"registry.example/app:v1"}`, 202},
		{"POST", "/images/pull", `{"ref":"oci:/srv/layout:v1","platform":"linux/arm64"}`, 202},
		{"POST", "/images/pull", `{"ref":"registry.example/missing:v1"}`, 202},
		{"GET", "/images/pulls/pull0001", "", 200},
		{"GET", "/images/pulls/pull0003", "", 200},
		{"GET", "/images", "", 200},
		{"GET", "/images/registry.example%2Fapp:v1", "", 200},
		{"POST", "/instances", `{"name":"from-image","image":"registry.example/app:v1","disk_size_mib":4096,"start":false}`, 201},
		{"DELETE", "/images/registry.example%2Fapp:v1", "", 409},
		{"POST", "/images/gc", "", 200},
		{"DELETE", "/instances/from-image", "", 204},
		{"DELETE", "/images/registry.example%2Fapp:v1", "", 204},
		{"GET", "/images/nope", "", 404},
		{"GET", "/images/pulls/nope", "", 404},
		{"POST", "/images/pull", `{"ref":""}`, 422},
		{"POST", "/instances", `{"name":"both","image":"a","rootfs":"/r"}`, 422},
		{"POST", "/instances", `{"name":"size","rootfs":"/r","disk_size_mib":64}`, 422},

		// Errors are part of the contract too.
		{"GET", "/instances/nope", "", 404},
		{"DELETE", "/instances/nope", "", 404},
		{"GET", "/snapshots/nope", "", 404},
		{"DELETE", "/snapshots/nope", "", 404},
		{"POST", "/snapshots/nope/fork", `{"name":"x"}`, 404},
		{"POST", "/instances/nope/snapshots", `{"name":"x"}`, 404},
		{"POST", "/instances/idle/restore", "", 409},
		{"POST", "/instances/idle/fork", `{"name":"x"}`, 409},
		{"POST", "/instances/web-1/forks", `{"name":"kid","count":4}`, 409}, // kid-1..3 exist: none made
		{"POST", "/snapshots/nope/forks", `{"name":"x","count":2}`, 404},
		{"POST", "/instances/web-1/forks", `{"name":"x","count":0}`, 422},
		{"POST", "/instances/web-1/forks", `{"name":"x","count":2,"from_running":true}`, 400},
		{"POST", "/instances", `{"name":"web-1"}`, 409},
		{"GET", "/instances/0", "", 409},
		{"POST", "/instances", `{"name":"Bad"}`, 422},
		{"POST", "/instances", `{"name":"ok","bogus":1}`, 400},
		{"POST", "/instances/idle/pause", `{"restore_backend":"tape"}`, 422},
	}
	for _, s := range steps {
		c.call(srv, s.method, s.path, s.body, s.status)
	}
	c.events(srv)

	// Every operation of the spec was exercised with a success status.
	var missing []string
	for path, item := range c.doc.Paths.Map() {
		for method := range item.Operations() {
			ok := false
			for status := range c.covered[method+" "+path] {
				ok = ok || status < 300
			}
			if !ok {
				missing = append(missing, method+" "+path)
			}
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("operations in api/openapi.yaml never exercised with a 2xx: %v", missing)
	}
}

// errService fails every call with err.
type errService struct {
	api.Service
	err error
}

func (e errService) ListInstances(context.Context) ([]api.Instance, error) { return nil, e.err }

func TestSentinelErrorsMapToStatusAndCode(t *testing.T) {
	c := newSpecChecker(t)
	cases := []struct {
		err    error
		status int
		code   string
	}{
		{fmt.Errorf("get x: %w", api.ErrNotFound), 404, api.CodeNotFound},
		{fmt.Errorf("standby x: %w", api.ErrInvalidState), 409, api.CodeInvalidState},
		{fmt.Errorf("create x: %w", api.ErrExists), 409, api.CodeAlreadyExists},
		{fmt.Errorf("get a: %w", api.ErrAmbiguous), 409, api.CodeAmbiguous},
		{fmt.Errorf("create a: %w: memory: short", api.ErrInsufficientResources), 409, api.CodeInsufficient},
		{fmt.Errorf("create: %w", api.ErrInvalid), 422, api.CodeInvalidRequest},
		{fmt.Errorf("pager: %w", api.ErrUnavailable), 503, api.CodeUnavailable},
		{fmt.Errorf("create: %w", api.ErrShuttingDown), 503, api.CodeShuttingDown},
		{fmt.Errorf("disk on fire"), 500, api.CodeInternal},
	}
	for _, tc := range cases {
		t.Run(tc.code, func(t *testing.T) {
			srv := newTestServer(t, errService{err: tc.err})
			body := c.call(srv, "GET", "/instances", "", tc.status)
			if !strings.Contains(string(body), `"code":"`+tc.code+`"`) || !strings.Contains(string(body), tc.err.Error()) {
				t.Errorf("body %s: want code %q and message %q", body, tc.code, tc.err)
			}

			// The client maps the code back to the same sentinel.
			cl, err := api.NewClient("tcp://" + strings.TrimPrefix(srv.URL, "http://"))
			if err != nil {
				t.Fatal(err)
			}
			_, err = cl.ListInstances(context.Background())
			if tc.status != 500 && !errorsIsSentinel(err, tc.err) {
				t.Errorf("client error %v does not unwrap to the sentinel in %v", err, tc.err)
			}
			if err == nil || !strings.Contains(err.Error(), tc.err.Error()) {
				t.Errorf("client error %v does not carry the server message %q", err, tc.err)
			}
		})
	}
}

func TestUnknownRoutesAnswerWithErrorDocuments(t *testing.T) {
	srv := newTestServer(t, newFakeService())
	cases := []struct {
		method, path string
		status       int
		code         string
	}{
		{"GET", "/nope", 404, api.CodeNotFound},
		{"PUT", "/instances", 405, api.CodeMethodNotAllowed},
		{"GET", "/instances/x/fork", 405, api.CodeMethodNotAllowed},
		{"POST", "/instances/x/explode", 404, api.CodeNotFound},
		{"GET", "/instances/x/forks", 405, api.CodeMethodNotAllowed},
		{"PUT", "/snapshots/x/forks", 405, api.CodeMethodNotAllowed},
	}
	for _, tc := range cases {
		req, _ := http.NewRequest(tc.method, srv.URL+tc.path, nil)
		resp, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status || !strings.Contains(string(body), `"code":"`+tc.code+`"`) {
			t.Errorf("%s %s: got %d %s, want %d with code %s", tc.method, tc.path, resp.StatusCode, body, tc.status, tc.code)
		}
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("%s %s: Content-Type %q, want application/json", tc.method, tc.path, ct)
		}
	}
}

func errorsIsSentinel(got, want error) bool {
	for _, s := range []error{api.ErrNotFound, api.ErrInvalidState, api.ErrExists, api.ErrAmbiguous, api.ErrInsufficientResources,
		api.ErrInvalid, api.ErrUnavailable, api.ErrShuttingDown} {
		if errors.Is(want, s) {
			return errors.Is(got, s)
		}
	}
	return false
}

// badShapeService returns instances the spec forbids.
type badShapeService struct{ api.Service }

func (badShapeService) ListInstances(context.Context) ([]api.Instance, error) {
	return []api.Instance{{ID: "x", Name: "Not_A_Name", State: "Sleeping", Vcpus: 1, MemoryMiB: 16}}, nil
}

// The twin of TestResponsesConformToOpenAPISpec: the checker must be able to fail.
func TestSpecCheckerRejectsNonConformingResponse(t *testing.T) {
	c := newSpecChecker(t)
	var failures []error
	c.report = func(err error) { failures = append(failures, err) }
	srv := newTestServer(t, badShapeService{})
	c.call(srv, "GET", "/instances", "", 200)
	if len(failures) == 0 {
		t.Fatal("a response with state \"Sleeping\" and name \"Not_A_Name\" passed spec validation; the checker checks nothing")
	}
	for _, want := range []string{"Sleeping", "Not_A_Name"} {
		if !strings.Contains(fmt.Sprint(failures), want) {
			t.Errorf("spec failures %v do not mention %q", failures, want)
		}
	}
}

type panicService struct{ api.Service }

func (panicService) ListInstances(context.Context) ([]api.Instance, error) { panic("boom") }

func TestPanicInServiceIsA500ErrorDocument(t *testing.T) {
	c := newSpecChecker(t)
	srv := newTestServer(t, panicService{})
	body := c.call(srv, "GET", "/instances", "", 500)
	if !strings.Contains(string(body), `"code":"internal"`) || !strings.Contains(string(body), "boom") {
		t.Errorf("panic answered with %s; want an internal error mentioning the panic", body)
	}
}
