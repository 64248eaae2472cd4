package api_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/api"
)

// fuzzRoutes are the endpoints whose request decoding the fuzzer drives;
// the fuzzer picks one by index and supplies the ref, content type and body.
var fuzzRoutes = []struct{ method, path string }{
	{"POST", "/instances"},
	{"POST", "/instances/{ref}/fork"},
	{"POST", "/instances/{ref}/snapshots"},
	{"POST", "/instances/{ref}/restore"},
	{"POST", "/instances/{ref}/standby"},
	{"POST", "/snapshots/{ref}/fork"},
	{"GET", "/instances/{ref}"},
	{"DELETE", "/instances/{ref}"},
	{"DELETE", "/snapshots/{ref}"},
	{"POST", "/instances/{ref}/forks"},
	{"POST", "/snapshots/{ref}/forks"},
}

// FuzzHandlerRequestDecoding sends arbitrary refs, content types and bodies
// through the real handler to a recording fake service. Whatever comes in:
// no 500 and no panic; every error is a JSON {code, message}; a request the
// edge refuses as malformed (400, 413, 415) never reaches the service; and
// nothing is ever created under a name that breaks NamePattern.
func FuzzHandlerRequestDecoding(f *testing.F) {
	f.Add(uint8(0), "", "application/json", `{"name":"a"}`)
	f.Add(uint8(0), "", "application/json", `{"name":"a","vcpus":2,"memory_mib":512,"boot_args":"x","start":false}`)
	f.Add(uint8(0), "", "application/json", `{"name":"../x"}`)
	f.Add(uint8(0), "", "text/plain", `{"name":"a"}`)
	f.Add(uint8(0), "", "application/json", `{"name":"a","memory_mib":-1}`)
	f.Add(uint8(0), "", "application/json", `{"name":"a"}{"name":"b"}`)
	f.Add(uint8(0), "", "application/json; charset=utf-8", `{"name":"a","vcpus":"2"}`)
	f.Add(uint8(1), "src", "application/json", `{"name":"kid","target_state":"Running","from_running":true}`)
	f.Add(uint8(1), "..%2Fx", "application/json", `{"name":"kid"}`)
	f.Add(uint8(2), "src", "application/json", `{"name":"s","compression":"zstd"}`)
	f.Add(uint8(3), "src", "application/json", `{"restore_backend":"uffd"}`)
	f.Add(uint8(4), "src", "", ``)
	f.Add(uint8(5), "snap", "application/json", `{"name":"k","restore_backend":"file"}`)
	f.Add(uint8(6), "%00", "", ``)
	f.Add(uint8(7), "a/b", "", ``)
	f.Add(uint8(8), ".", "", ``)
	f.Add(uint8(9), "src", "application/json", `{"name":"kid","count":3,"target_state":"Stopped"}`)
	f.Add(uint8(9), "src", "application/json", `{"name":"kid","count":1001}`)
	f.Add(uint8(10), "snap", "application/json", `{"name":"k","count":2,"publish":[]}`)
	f.Fuzz(func(t *testing.T, route uint8, ref, ctype, body string) {
		svc := newFakeService()
		h, err := api.NewHandler(svc, api.HandlerOptions{})
		if err != nil {
			t.Fatal(err)
		}
		// A source to act on, so valid requests get past "not found".
		seed := httptest.NewRequest("POST", "/instances", strings.NewReader(`{"name":"src"}`))
		seed.Header.Set("Content-Type", "application/json")
		h.ServeHTTP(httptest.NewRecorder(), seed)

		rt := fuzzRoutes[int(route)%len(fuzzRoutes)]
		path := strings.ReplaceAll(rt.path, "{ref}", ref)
		if !strings.HasPrefix(path, "/") || strings.ContainsAny(path, " \r\n\t#?") {
			return // not a request line an HTTP client can send
		}
		req, err := http.NewRequest(rt.method, "http://forkd"+path, strings.NewReader(body))
		if err != nil {
			return
		}
		if ctype != "" {
			req.Header.Set("Content-Type", ctype)
		}
		before := svc.Calls()
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		status := rec.Code
		if status >= 500 {
			t.Fatalf("%s %s (%q, %q): %d %s", rt.method, path, ctype, body, status, rec.Body)
		}
		if status >= 400 {
			var e api.Error
			if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Code == "" || e.Message == "" {
				t.Fatalf("%s %s: %d body is not an error document: %q", rt.method, path, status, rec.Body)
			}
		}
		switch status {
		case http.StatusBadRequest, http.StatusRequestEntityTooLarge, http.StatusUnsupportedMediaType:
			if svc.Calls() != before {
				t.Fatalf("%s %s (%q, %q) refused with %d but reached the service", rt.method, path, ctype, body, status)
			}
		}
		list, _ := svc.ListInstances(t.Context())
		for _, in := range list {
			if api.ValidateName("instance", in.Name) != nil {
				t.Fatalf("an instance was created with the invalid name %q", in.Name)
			}
		}
	})
}
