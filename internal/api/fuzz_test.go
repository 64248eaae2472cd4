package api_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/api"
)

// FuzzRequestBodies feeds arbitrary bodies to every endpoint that takes one:
// the handler must never panic, must always answer with an error document
// or a success, and a 4xx must never have reached the Service.
func FuzzRequestBodies(f *testing.F) {
	for _, seed := range []string{
		`{"name":"a"}`, `{"name":"a","vcpus":2}`, `{}`, `[]`, `null`, `"x"`, `{"name":"../x"}`,
		`{"name":"a"}{}`, `{"name":"a","target_state":"Running"}`, "\x00", `{"name":1e400}`,
		`{"restore_backend":"uffd"}`, `{"name":"a","compression":"zstd"}`, `{"name":"a","start":false}`,
		`{"name":"a","count":3}`, `{"name":"a","count":0}`, `{"name":"a","count":2,"from_running":true}`,
	} {
		f.Add(seed)
	}
	paths := []string{"/instances", "/instances/src/fork", "/instances/src/snapshots", "/instances/src/restore", "/snapshots/snap/fork",
		"/instances/src/forks", "/snapshots/snap/forks"}
	f.Fuzz(func(t *testing.T, body string) {
		svc := newFakeService()
		h, err := api.NewHandler(svc, api.HandlerOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range paths {
			before := svc.Calls()
			req := httptest.NewRequest(http.MethodPost, p, strings.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code >= 400 {
				var e api.Error
				if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Code == "" {
					t.Fatalf("POST %s %q: %d with a body that is not an error document: %q", p, body, rec.Code, rec.Body)
				}
			}
			if rec.Code >= 400 && rec.Code < 500 && svc.Calls() != before &&
				rec.Code != http.StatusNotFound && rec.Code != http.StatusConflict {
				t.Fatalf("POST %s %q: refused with %d after reaching the service", p, body, rec.Code)
			}
		}
	})
}
