package api_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/api"
)

func TestBearerTokenGuardsTCP(t *testing.T) {
	const token = "s3cret-token-value"
	inner, err := api.NewHandler(newFakeService(), api.HandlerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(api.RequireBearer(token, inner))
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
	h := api.RequireBearer("", inner)
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
