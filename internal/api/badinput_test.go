package api_test

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/api"
)

// TestMalformedRequestsAreRefusedAndChangeNothing sends requests the edge
// must refuse and checks the status, the error code, and that the service
// was never called (so nothing can have changed).
func TestMalformedRequestsAreRefusedAndChangeNothing(t *testing.T) {
	huge := `{"name":"big","boot_args":"` + strings.Repeat("a", api.MaxBodyBytes) + `"}`
	cases := []struct {
		name         string
		method, path string
		contentType  string // "" → application/json when there is a body
		body         string
		status       int
		code         string
	}{
		{"unknown field", "POST", "/instances", "", `{"name":"a","colour":"blue"}`, 400, api.CodeBadRequest},
		{"unknown field in fork", "POST", "/instances/src/fork", "", `{"name":"a","force":true}`, 400, api.CodeBadRequest},
		{"unknown field in fork batch", "POST", "/instances/src/forks", "", `{"name":"a","count":2,"force":true}`, 400, api.CodeBadRequest},
		{"publish in fork batch", "POST", "/snapshots/s/forks", "", `{"name":"a","count":2,"publish":[]}`, 400, api.CodeBadRequest},
		{"from_running in fork batch", "POST", "/instances/src/forks", "", `{"name":"a","count":2,"from_running":true}`, 400, api.CodeBadRequest},
		{"empty fork batch body", "POST", "/instances/src/forks", "", ``, 400, api.CodeBadRequest},
		{"fork batch count 0", "POST", "/instances/src/forks", "", `{"name":"a","count":0}`, 422, api.CodeInvalidRequest},
		{"fork batch count past the limit", "POST", "/snapshots/s/forks", "", `{"name":"a","count":1001}`, 422, api.CodeInvalidRequest},
		{"fork batch name too long with its count", "POST", "/instances/src/forks", "", `{"name":"` + strings.Repeat("a", 60) + `","count":100}`, 422, api.CodeInvalidName},
		{"fork batch bad target_state", "POST", "/instances/src/forks", "", `{"name":"a","count":2,"target_state":"Paused"}`, 422, api.CodeInvalidRequest},
		{"form content type in fork batch", "POST", "/instances/src/forks", "application/x-www-form-urlencoded", `name=a&count=2`, 415, api.CodeUnsupportedMediaType},
		{"unknown field in action", "POST", "/instances/src/restore", "", `{"backend":"uffd"}`, 400, api.CodeBadRequest},
		{"string where int", "POST", "/instances", "", `{"name":"a","vcpus":"2"}`, 400, api.CodeBadRequest},
		{"bool where string", "POST", "/instances/src/fork", "", `{"name":true}`, 400, api.CodeBadRequest},
		{"int overflow", "POST", "/instances", "", `{"name":"a","memory_mib":99999999999999999999999}`, 400, api.CodeBadRequest},
		{"array body", "POST", "/instances", "", `[{"name":"a"}]`, 400, api.CodeBadRequest},
		{"malformed JSON", "POST", "/instances", "", `{"name":"a",`, 400, api.CodeBadRequest},
		{"empty body", "POST", "/instances", "", ``, 400, api.CodeBadRequest},
		{"empty fork body", "POST", "/instances/src/fork", "", ``, 400, api.CodeBadRequest},
		{"trailing data", "POST", "/instances", "", `{"name":"a"}{"name":"b"}`, 400, api.CodeBadRequest},
		{"trailing garbage", "POST", "/instances/src/snapshots", "", `{"name":"s"} x`, 400, api.CodeBadRequest},
		{"oversized body", "POST", "/instances", "", huge, 413, api.CodeBodyTooLarge},
		{"wrong content type", "POST", "/instances", "text/plain", `{"name":"a"}`, 415, api.CodeUnsupportedMediaType},
		{"form content type", "POST", "/instances/src/fork", "application/x-www-form-urlencoded", `name=a`, 415, api.CodeUnsupportedMediaType},
		{"missing content type", "POST", "/instances", "none", `{"name":"a"}`, 415, api.CodeUnsupportedMediaType},
		{"missing name", "POST", "/instances", "", `{"vcpus":1}`, 422, api.CodeInvalidName},
		{"uppercase name", "POST", "/instances", "", `{"name":"Web"}`, 422, api.CodeInvalidName},
		{"path traversal name", "POST", "/instances", "", `{"name":"../x"}`, 422, api.CodeInvalidName},
		{"slash in fork name", "POST", "/instances/src/fork", "", `{"name":"a/b"}`, 422, api.CodeInvalidName},
		{"leading dash", "POST", "/instances/src/snapshots", "", `{"name":"-s"}`, 422, api.CodeInvalidName},
		{"name too long", "POST", "/instances", "", `{"name":"` + strings.Repeat("a", 64) + `"}`, 422, api.CodeInvalidName},
		{"name shaped like an id", "POST", "/instances", "", `{"name":"0123456789abcdef01234567"}`, 422, api.CodeInvalidName},
		{"fork name shaped like an id", "POST", "/instances/src/fork", "", `{"name":"0123456789abcdef01234567"}`, 422, api.CodeInvalidName},
		{"snapshot name shaped like an id", "POST", "/instances/src/snapshots", "", `{"name":"0123456789abcdef01234567"}`, 422, api.CodeInvalidName},
		{"path traversal ref", "GET", "/instances/..%2Fx", "", ``, 422, api.CodeInvalidName},
		{"dot ref in delete", "DELETE", "/snapshots/.hidden", "", ``, 422, api.CodeInvalidName},
		{"negative vcpus", "POST", "/instances", "", `{"name":"a","vcpus":-1}`, 422, api.CodeInvalidRequest},
		{"too many vcpus", "POST", "/instances", "", `{"name":"a","vcpus":33}`, 422, api.CodeInvalidRequest},
		{"negative memory", "POST", "/instances", "", `{"name":"a","memory_mib":-512}`, 422, api.CodeInvalidRequest},
		{"huge memory", "POST", "/instances", "", `{"name":"a","memory_mib":1048576}`, 422, api.CodeInvalidRequest},
		{"bad huge_pages", "POST", "/instances", "", `{"name":"a","huge_pages":"1G"}`, 422, api.CodeInvalidRequest},
		{"lowercase huge_pages", "POST", "/instances", "", `{"name":"a","huge_pages":"2m"}`, 422, api.CodeInvalidRequest},
		{"odd memory with huge_pages", "POST", "/instances", "", `{"name":"a","memory_mib":255,"huge_pages":"2M"}`, 422, api.CodeInvalidRequest},
		{"bad action", "POST", "/instances/src/explode", "", ``, 404, api.CodeNotFound},
		{"bad action next to forks", "POST", "/instances/src/forkz", "", ``, 404, api.CodeNotFound},
		{"bad target_state", "POST", "/instances/src/fork", "", `{"name":"a","target_state":"Paused"}`, 422, api.CodeInvalidRequest},
		{"bad restore_backend", "POST", "/instances/src/restore", "", `{"restore_backend":"tape"}`, 422, api.CodeInvalidRequest},
		{"bad fork restore_backend", "POST", "/snapshots/s/fork", "", `{"name":"a","restore_backend":"nfs"}`, 422, api.CodeInvalidRequest},
		{"bad compression", "POST", "/instances/src/snapshots", "", `{"name":"s","compression":"gzip"}`, 422, api.CodeInvalidRequest},
	}
	svc := newFakeService()
	srv := newTestServer(t, svc)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := svc.Calls()
			req, err := http.NewRequest(tc.method, srv.URL+tc.path, strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			switch {
			case tc.contentType == "none":
			case tc.contentType != "":
				req.Header.Set("Content-Type", tc.contentType)
			case tc.body != "":
				req.Header.Set("Content-Type", "application/json")
			}
			resp, err := srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			raw, _ := io.ReadAll(resp.Body)
			var e api.Error
			if err := json.Unmarshal(raw, &e); err != nil {
				t.Fatalf("error body %q is not an error document: %v", raw, err)
			}
			if resp.StatusCode != tc.status || e.Code != tc.code {
				t.Errorf("got %d %q (%s), want %d %q", resp.StatusCode, e.Code, e.Message, tc.status, tc.code)
			}
			if e.Message == "" {
				t.Error("error message is empty; it must say what was wrong")
			}
			if after := svc.Calls(); after != before {
				t.Errorf("the service was called %d time(s) for a refused request", after-before)
			}
		})
	}
	// And nothing exists afterwards.
	if list, _ := svc.ListInstances(t.Context()); len(list) != 0 {
		t.Errorf("instances exist after only malformed requests: %+v", list)
	}
}

// The twin: the same endpoints with well-formed bodies do reach the service,
// so the table above fails for the right reason.
func TestWellFormedRequestsReachTheService(t *testing.T) {
	svc := newFakeService()
	srv := newTestServer(t, svc)
	for _, body := range []string{`{"name":"a"}`, `{"name":"b","vcpus":32,"memory_mib":16}`, "  {\"name\":\"c\"}\n"} {
		resp, err := srv.Client().Post(srv.URL+"/instances", "application/json; charset=utf-8", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			t.Errorf("POST /instances %s: status %d, want 201", body, resp.StatusCode)
		}
	}
	if got := svc.Calls(); got != 3 {
		t.Errorf("service saw %d calls, want 3", got)
	}
}

// A name must never have an id's shape (it would shadow that id), but a
// reference may be an id.
func TestIDShapedNamesAreRefusedButIDsResolve(t *testing.T) {
	id := "0123456789abcdef01234567"
	if err := api.ValidateName("instance name", id); err == nil {
		t.Errorf("ValidateName(%q) accepted an id-shaped name", id)
	}
	for _, ok := range []string{id, id[:6], "web", "0123456789abcdef0123456", "0123456789abcdef012345678"} {
		if err := api.ValidateRef(ok); err != nil {
			t.Errorf("ValidateRef(%q): %v", ok, err)
		}
	}
	for _, ok := range []string{"0123456789abcdef0123456", "0123456789abcdef012345678", "web"} {
		if err := api.ValidateName("instance name", ok); err != nil {
			t.Errorf("ValidateName(%q) (not 24 hex digits): %v", ok, err)
		}
	}
}
