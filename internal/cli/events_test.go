package cli

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// eventService serves one instance ("web") and the events a test feeds it.
type eventService struct {
	api.Service
	mu         sync.Mutex
	state      string
	subscribed chan chan api.Event // each subscription's channel, for the test to feed
}

func newEventService(state string) *eventService {
	return &eventService{state: state, subscribed: make(chan chan api.Event, 4)}
}

func (s *eventService) GetInstance(_ context.Context, ref string) (api.Instance, error) {
	if ref != "web" {
		return api.Instance{}, api.ErrNotFound
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return api.Instance{ID: "0123456789abcdef01234567", Name: "web", State: s.state}, nil
}

func (s *eventService) Events(ctx context.Context) (<-chan api.Event, error) {
	ch := make(chan api.Event, 16)
	s.subscribed <- ch
	return ch, nil
}

func webEvent(typ, state, errText string) api.Event {
	return api.Event{Time: time.Now(), Type: typ, Instance: &api.EventRef{ID: "0123456789abcdef01234567", Name: "web"}, State: state, Error: errText}
}

// forkd wait exits 0 when the instance reaches the state (already, or by
// an event), 1 on timeout, 2 when it reaches Error or is deleted, and says
// why on stderr.
func TestWaitExitCodes(t *testing.T) {
	for _, tc := range []struct {
		name    string
		state   string      // the instance's state when wait reads it
		events  []api.Event // fed after the read
		args    []string
		want    int
		wantErr string
	}{
		{"already there", api.StateRunning, nil, nil, 0, ""},
		{"gets there", api.StateRestoring, []api.Event{
			webEvent(api.EventInstanceState, api.StateRestoring, ""),
			webEvent(api.EventInstanceError, api.StateStandby, "a failed restore"),
			webEvent(api.EventInstanceState, api.StateRunning, "")}, nil, 0, ""},
		{"times out", api.StateStandby, nil, []string{"--timeout", "200ms"}, 1, "after the timeout"},
		{"goes to Error", api.StateRestoring, []api.Event{webEvent(api.EventInstanceError, api.StateError, "pager gone")}, nil, 2, "pager gone"},
		{"is deleted", api.StateStandby, []api.Event{webEvent(api.EventInstanceDeleted, "", "")}, nil, 2, "deleted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			svc := newEventService(tc.state)
			sock := serve(t, svc)
			go func() {
				ch := <-svc.subscribed
				for _, ev := range tc.events {
					ch <- ev
				}
			}()
			args := append([]string{"--host", sock, "wait", "web", "--state", api.StateRunning}, tc.args...)
			_, stderr, code := run(t, args...)
			if code != tc.want || !strings.Contains(stderr, tc.wantErr) {
				t.Fatalf("wait: exit %d, stderr %q; want exit %d mentioning %q", code, stderr, tc.want, tc.wantErr)
			}
		})
	}
}

func TestWaitForAnUnknownInstanceIsExit2(t *testing.T) {
	sock := serve(t, newEventService(api.StateRunning))
	if _, stderr, code := run(t, "--host", sock, "wait", "nope", "--state", "Running"); code != 2 {
		t.Fatalf("wait for an unknown instance: exit %d (%s), want 2", code, stderr)
	}
	if _, stderr, code := run(t, "--host", sock, "wait", "web", "--state", "Restoring"); code != 1 || !strings.Contains(stderr, "want one of") {
		t.Fatalf("wait for a transient state: exit %d (%s), want a usage error", code, stderr)
	}
}

// forkd events prints each event as a line, and its JSON with -o json.
func TestEventsPrintsEachEvent(t *testing.T) {
	svc := newEventService(api.StateRunning)
	sock := serve(t, svc)
	go func() {
		ch := <-svc.subscribed
		ch <- webEvent(api.EventInstanceState, api.StateStandby, "")
		ch <- webEvent(api.EventInstanceError, api.StateRunning, "restore failed: disk full")
		close(ch) // the daemon ends the stream
	}()
	out, _, code := run(t, "--host", sock, "events")
	if code != 1 || !strings.Contains(out, "instance.state") || !strings.Contains(out, "web (0123456789ab)  Standby") ||
		!strings.Contains(out, "error: restore failed: disk full") {
		t.Fatalf("events (exit %d):\n%s", code, out)
	}
	go func() {
		ch := <-svc.subscribed
		ch <- webEvent(api.EventInstanceDeleted, "", "")
		close(ch)
	}()
	out, _, _ = run(t, "--host", sock, "events", "-o", "json")
	if !strings.Contains(out, `"type":"instance.deleted"`) || strings.Count(out, "\n") != 1 {
		t.Fatalf("events -o json: %q, want one JSON line", out)
	}
}

// busyForks answers each fork's, and each batch's, first attempt 429 busy,
// then forks.
type busyForks struct {
	api.Service
	mu      sync.Mutex
	tried   map[string]int // by fork name, or "batch NAME COUNT"
	made    []string
	batches int // batch calls, busy ones too
}

func (s *busyForks) GetInstance(_ context.Context, ref string) (api.Instance, error) {
	return api.Instance{ID: "0123456789abcdef01234567", Name: ref, State: api.StateStandby}, nil
}

func (s *busyForks) fork(name string) api.Instance {
	s.made = append(s.made, name)
	return api.Instance{ID: fmt.Sprintf("0123456789abcdef0123%04d", len(s.made)), Name: name, State: api.StateStandby,
		ForkMode: api.ForkModeHardlink, Vcpus: 1, MemoryMiB: 256, CreatedAt: time.Now()}
}

func (s *busyForks) ForkInstance(_ context.Context, ref string, req api.ForkRequest) (api.Instance, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tried[req.Name]++
	if s.tried[req.Name] == 1 {
		return api.Instance{}, api.ErrBusy
	}
	return s.fork(req.Name), nil
}

func (s *busyForks) ForkInstanceBatch(_ context.Context, ref string, req api.ForkBatchRequest) ([]api.Instance, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.batches++
	key := fmt.Sprintf("batch %s %d", req.Name, req.Count)
	s.tried[key]++
	if s.tried[key] == 1 {
		return nil, api.ErrBusy // refused before anything was made
	}
	var out []api.Instance
	for _, n := range req.Names() {
		out = append(out, s.fork(n))
	}
	return out, nil
}

// fork --count --separate retries each fork the daemon answered 429 busy,
// after its Retry-After, until it is admitted.
func TestForkCountSeparateRetriesBusyAnswers(t *testing.T) {
	svc := &busyForks{tried: map[string]int{}}
	sock := serve(t, svc)
	out, stderr, code := run(t, "--host", sock, "fork", "web", "kid", "--count", "3", "--separate")
	if code != 0 {
		t.Fatalf("fork --count 3 --separate with busy answers: exit %d\n%s%s", code, out, stderr)
	}
	if !strings.Contains(out, "3/3 forks") || !strings.Contains(out, "3 forks waited for the daemon's max_heavy_ops (3 busy answers retried)") {
		t.Fatalf("fork --count --separate output:\n%s", out)
	}
	for _, n := range []string{"kid-1", "kid-2", "kid-3"} {
		if svc.tried[n] != 2 {
			t.Errorf("%s tried %d times, want 2 (busy, then admitted)", n, svc.tried[n])
		}
	}
	if svc.batches != 0 {
		t.Errorf("--separate made %d batch calls, want none", svc.batches)
	}
}

// fork --count retries a batch the daemon answered 429 busy whole, the same
// batch again, until it is admitted: each fork is made once.
func TestForkCountRetriesABusyBatchWhole(t *testing.T) {
	svc := &busyForks{tried: map[string]int{}}
	sock := serve(t, svc)
	out, stderr, code := run(t, "--host", sock, "fork", "web", "kid", "--count", "3")
	if code != 0 {
		t.Fatalf("fork --count 3 with a busy answer: exit %d\n%s%s", code, out, stderr)
	}
	if !strings.Contains(out, "3/3 forks") || !strings.Contains(out, "the batch waited for the daemon's max_heavy_ops (1 busy answers retried)") {
		t.Fatalf("fork --count output:\n%s", out)
	}
	if svc.tried["batch kid 3"] != 2 || svc.batches != 2 {
		t.Errorf("batch calls %d (%v), want the same batch twice (busy, then admitted)", svc.batches, svc.tried)
	}
	if fmt.Sprint(svc.made) != "[kid-1 kid-2 kid-3]" {
		t.Errorf("forks made %v, want each of kid-1..kid-3 once", svc.made)
	}
	out, _, _ = run(t, "--host", sock, "-o", "json", "fork", "web", "j", "--count", "2")
	if strings.Count(out, `"retries": 1`) != 2 {
		t.Errorf("-o json of a batch retried once: %s; want retries 1 on each fork", out)
	}
}
