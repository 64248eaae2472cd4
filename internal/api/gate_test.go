package api

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// The gate counts admitted changes, refuses new ones once closed with 503
// shutting_down (reads still pass), and Wait returns once the last change
// in flight has returned, or names what still runs when its context ends.
func TestGateRefusesNewChangesAndWaitsForTheOnesInFlight(t *testing.T) {
	g := NewGate()
	entered, release := make(chan struct{}), make(chan struct{})
	h := g.Wrap(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			close(entered)
			<-release
		}
		w.WriteHeader(http.StatusOK)
	}))
	done := make(chan int, 1)
	go func() {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/instances/a/standby", nil))
		done <- rec.Code
	}()
	<-entered
	g.Close()

	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodDelete, "/instances/b", nil))
	if rec.Code != http.StatusServiceUnavailable || !strings.Contains(rec.Body.String(), CodeShuttingDown) {
		t.Fatalf("a change after Close: %d %s; want 503 %s", rec.Code, rec.Body, CodeShuttingDown)
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/instances", nil))
	if rec.Code != http.StatusOK || rec.Header().Get("Connection") != "close" {
		t.Fatalf("a read after Close: %d, Connection %q; want 200, close", rec.Code, rec.Header().Get("Connection"))
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := g.Wait(ctx); !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "POST /instances/a/standby") {
		t.Fatalf("Wait with a change in flight: %v; want the deadline, naming the change", err)
	}
	close(release)
	if code := <-done; code != http.StatusOK {
		t.Fatalf("the change in flight at Close: %d, want it served", code)
	}
	if err := g.Wait(context.Background()); err != nil {
		t.Fatalf("Wait after the last change returned: %v", err)
	}
}
