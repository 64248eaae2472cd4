package api_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/forkd/forkd/internal/api"
)

func TestBearerTokenGuardsTCP(t *testing.T) {
	const token = "s3cret-token-value"
	inner, err := api.NewHandler(newFakeService(), api.HandlerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	guarded, err := api.RequireBearer(token, inner, api.BearerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(guarded)
	t.Cleanup(srv.Close)

	cases := []struct {
		name   string
		header string
		status int
	}{
		{"no header", "", http.StatusUnauthorized},
		{"wrong token", "Bearer nope", http.StatusUnauthorized},
		{"token prefix", "Bearer s3cret", http.StatusUnauthorized},
		{"token plus suffix", "Bearer " + token + "x", http.StatusUnauthorized},
		{"basic scheme", "Basic " + token, http.StatusUnauthorized},
		{"empty bearer", "Bearer ", http.StatusUnauthorized},
		{"right token", "Bearer " + token, http.StatusOK},
		{"scheme is case-insensitive", "bearer " + token, http.StatusOK},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", srv.URL+"/instances", nil)
			if tc.header != "" {
				req.Header.Set("Authorization", tc.header)
			}
			resp, err := srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Errorf("Authorization %q: status %d, want %d", tc.header, resp.StatusCode, tc.status)
			}
			if tc.status == http.StatusUnauthorized && !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer") {
				t.Errorf("401 without a WWW-Authenticate: Bearer challenge")
			}
		})
	}

	// The typed client sends the token it was given.
	addr := "tcp://" + strings.TrimPrefix(srv.URL, "http://")
	good, _ := api.NewClient(addr, api.WithToken(token+"\n"))
	if _, err := good.ListInstances(context.Background()); err != nil {
		t.Errorf("client with the right token: %v", err)
	}
	bad, _ := api.NewClient(addr, api.WithToken("wrong"))
	_, err = bad.ListInstances(context.Background())
	var se *api.StatusError
	if !errors.As(err, &se) || se.Code != api.CodeUnauthorized {
		t.Errorf("client with a wrong token: got %v, want a %s error", err, api.CodeUnauthorized)
	}
}

func TestEmptyTokenLetsNobodyIn(t *testing.T) {
	inner, _ := api.NewHandler(newFakeService(), api.HandlerOptions{})
	h, err := api.RequireBearer("", inner, api.BearerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, hdr := range []string{"", "Bearer ", "Bearer x"} {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest("GET", "/health", nil)
		req.Header.Set("Authorization", hdr)
		h.ServeHTTP(rec, req)
		if rec.Code != http.StatusUnauthorized {
			t.Errorf("empty configured token, Authorization %q: status %d, want 401", hdr, rec.Code)
		}
	}
}

// Finding: failed authentications were neither logged nor counted. Now each
// is counted by reason, and logged at most once per LogEvery (the first at
// once; later lines say how many were not logged), so a token guesser can
// neither hide nor flood the log.
func TestFailedAuthenticationsAreCountedAndLoggedRateLimited(t *testing.T) {
	const token = "s3cret-token-value"
	inner, _ := api.NewHandler(newFakeService(), api.HandlerOptions{})
	reg := prometheus.NewRegistry()
	var logs bytes.Buffer
	now := time.Unix(1000, 0)
	h, err := api.RequireBearer(token, inner, api.BearerOptions{
		Logger:     slog.New(slog.NewTextHandler(&logs, nil)),
		LogEvery:   10 * time.Second,
		Registerer: reg,
		Now:        func() time.Time { return now },
	})
	if err != nil {
		t.Fatal(err)
	}
	send := func(hdr string) int {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest("GET", "/instances", nil)
		if hdr != "" {
			req.Header.Set("Authorization", hdr)
		}
		h.ServeHTTP(rec, req)
		return rec.Code
	}
	for i := 0; i < 50; i++ {
		send("Bearer guess")
	}
	send("")
	send("Bearer " + token) // the right token is neither counted nor logged
	if n := strings.Count(logs.String(), "refused a request"); n != 1 {
		t.Fatalf("%d log lines for 51 failures within 10 s, want 1:\n%s", n, logs.String())
	}
	now = now.Add(11 * time.Second)
	send("Bearer guess")
	if n := strings.Count(logs.String(), "refused a request"); n != 2 || !strings.Contains(logs.String(), "also_refused_since_last_line=50") {
		t.Errorf("after the interval: %d lines, want 2, the second counting the 50 not logged:\n%s", n, logs.String())
	}
	want := map[string]float64{"wrong": 51, "missing": 1}
	mfs, _ := reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() != "forkd_api_auth_failures_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			reason := m.GetLabel()[0].GetValue()
			if got := m.GetCounter().GetValue(); got != want[reason] {
				t.Errorf("forkd_api_auth_failures_total{reason=%q} = %v, want %v", reason, got, want[reason])
			}
			delete(want, reason)
		}
	}
	if len(want) != 0 {
		t.Errorf("series missing: %v", want)
	}
}

// Requests let through the bearer guard reach the service marked remote;
// the Unix socket's (no guard) are not.
func TestRequestsThroughTheBearerGuardAreRemote(t *testing.T) {
	const token = "s3cret-token-value"
	var seen []bool
	inner := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { seen = append(seen, api.IsRemote(r.Context())) })
	h, err := api.RequireBearer(token, inner, api.BearerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest("GET", "/instances", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	h.ServeHTTP(httptest.NewRecorder(), req)
	inner.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/instances", nil))
	if len(seen) != 2 || !seen[0] || seen[1] {
		t.Errorf("IsRemote through the guard, then without: %v; want [true false]", seen)
	}
}
