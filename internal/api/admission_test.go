package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

// blockingService blocks creates until release is closed.
type blockingService struct {
	Service
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func (s *blockingService) CreateInstance(ctx context.Context, req CreateInstanceRequest) (Instance, error) {
	s.once.Do(func() { close(s.entered) })
	<-s.release
	return Instance{ID: "0123456789abcdef01234567", Name: req.Name, State: StateRunning, Vcpus: 1, MemoryMiB: 256}, nil
}

func (s *blockingService) ForkInstanceBatch(ctx context.Context, ref string, req ForkBatchRequest) ([]Instance, error) {
	s.once.Do(func() { close(s.entered) })
	<-s.release
	out := make([]Instance, req.Count)
	for i, n := range req.Names() {
		out[i] = Instance{ID: fmt.Sprintf("0123456789abcdef0123%04d", i), Name: n, State: StateStandby, Vcpus: 1, MemoryMiB: 256}
	}
	return out, nil
}

func (s *blockingService) Action(ctx context.Context, ref, action string, req ActionRequest) (Instance, error) {
	return Instance{ID: "0123456789abcdef01234567", Name: ref, State: StatePaused, Vcpus: 1, MemoryMiB: 256}, nil
}

// Past max_heavy_ops a heavy request is answered at once with 429 busy and
// Retry-After; cheap ones (pause) are never refused; and when the heavy
// operation in flight ends, the next one is admitted.
func TestAdmissionRefusesHeavyOperationsPastTheLimit(t *testing.T) {
	svc := &blockingService{entered: make(chan struct{}), release: make(chan struct{})}
	h, err := NewHandler(svc, HandlerOptions{MaxHeavyOps: 1})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	defer srv.Close()
	create := func() *http.Response {
		resp, err := http.Post(srv.URL+"/instances", "application/json", strings.NewReader(`{"name":"web"}`))
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	first := make(chan int, 1)
	go func() { r := create(); r.Body.Close(); first <- r.StatusCode }()
	<-svc.entered

	resp := create()
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "1" {
		t.Fatalf("a create past the limit: %d, Retry-After %q; want 429 with Retry-After 1", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	c := &Client{base: srv.URL, hc: srv.Client()}
	_, err = c.CreateInstance(context.Background(), CreateInstanceRequest{Name: "web2"})
	var se *StatusError
	if !errors.As(err, &se) || se.Code != CodeBusy || se.RetryAfter.Seconds() != 1 || !errors.Is(err, ErrBusy) {
		t.Fatalf("client error past the limit: %v; want ErrBusy with RetryAfter 1s", err)
	}
	if r, err := http.Post(srv.URL+"/instances/web/pause", "application/json", nil); err != nil || r.StatusCode != 200 {
		t.Fatalf("a pause while the heavy slot is taken: %v %v; want 200 (cheap operations are never refused)", r, err)
	}
	close(svc.release)
	if code := <-first; code != http.StatusCreated {
		t.Fatalf("the admitted create: %d", code)
	}
	resp = create()
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("a create after the slot freed: %d, want 201", resp.StatusCode)
	}
}

// A batch of forks is one heavy operation however many forks it makes: a
// batch of 10 is admitted under a limit of 1, and while it runs every
// other heavy request, a fork or another batch, is answered 429 busy.
func TestAdmissionCountsABatchOfForksAsOne(t *testing.T) {
	svc := &blockingService{entered: make(chan struct{}), release: make(chan struct{})}
	h, err := NewHandler(svc, HandlerOptions{MaxHeavyOps: 1})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	defer srv.Close()
	post := func(path, body string) *http.Response {
		resp, err := http.Post(srv.URL+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	first := make(chan *http.Response, 1)
	go func() { first <- post("/instances/web/forks", `{"name":"kid","count":10}`) }()
	<-svc.entered
	for _, p := range []struct{ path, body string }{
		{"/instances/web/forks", `{"name":"more","count":2}`},
		{"/snapshots/snap/forks", `{"name":"more","count":1}`},
		{"/instances/web/fork", `{"name":"one"}`},
	} {
		resp := post(p.path, p.body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" {
			t.Errorf("POST %s while a batch holds the only slot: %d, want 429 with Retry-After", p.path, resp.StatusCode)
		}
	}
	close(svc.release)
	resp := <-first
	defer resp.Body.Close()
	var b ForkBatch
	if err := json.NewDecoder(resp.Body).Decode(&b); err != nil || resp.StatusCode != http.StatusCreated || len(b.Forks) != 10 {
		t.Fatalf("the admitted batch: %d, %d forks (%v); want 201 with 10", resp.StatusCode, len(b.Forks), err)
	}
}

// GET /health carries the backend's advice about the host.
func TestHealthCarriesAdvice(t *testing.T) {
	h, err := NewHandler(&blockingService{}, HandlerOptions{Advice: func() []string { return []string{"use XFS"} }})
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/health", nil))
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), `"advice":["use XFS"]`) {
		t.Fatalf("GET /health: %d %s; want the advice", rec.Code, rec.Body)
	}
}
