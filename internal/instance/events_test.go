package instance

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// eventLog reads a subscription in the background.
type eventLog struct {
	ch  <-chan api.Event
	got []api.Event
}

// next returns the next event matching keep, failing t after a minute.
func (l *eventLog) next(t *testing.T, keep func(api.Event) bool) api.Event {
	t.Helper()
	timeout := time.After(time.Minute)
	for {
		select {
		case ev, ok := <-l.ch:
			if !ok {
				t.Fatalf("the event stream ended; events so far: %s", l)
			}
			l.got = append(l.got, ev)
			if keep(ev) {
				return ev
			}
		case <-timeout:
			t.Fatalf("no matching event in a minute; events so far: %s", l)
		}
	}
}

func (l *eventLog) String() string {
	var b strings.Builder
	for _, ev := range l.got {
		name := ""
		switch {
		case ev.Instance != nil:
			name = ev.Instance.Name
		case ev.Snapshot != nil:
			name = ev.Snapshot.Name
		}
		fmt.Fprintf(&b, "\n  %s %s %s %q", ev.Type, name, ev.State, ev.Error)
	}
	return b.String()
}

func about(name string) func(api.Event) bool {
	return func(ev api.Event) bool {
		return (ev.Instance != nil && ev.Instance.Name == name) || (ev.Snapshot != nil && ev.Snapshot.Name == name)
	}
}

// expect reads the events about name up to the next one of type typ and
// checks it.
func (l *eventLog) expect(t *testing.T, name, typ, state string) api.Event {
	t.Helper()
	ev := l.next(t, func(ev api.Event) bool {
		return about(name)(ev) && ev.Type == typ && (state == "" || ev.State == state)
	})
	if ev.Time.IsZero() {
		t.Errorf("event %s of %s has no time", typ, name)
	}
	return ev
}

// GET /events covers state changes, forks, snapshots, errors and deletes,
// from the store's committed writes, in order; what is still being made
// (a fork building its dir) is not news until it is done.
func TestEventsCoverStatesForksSnapshotsErrorsAndDeletes(t *testing.T) {
	m := newTestManager(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, err := m.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	l := &eventLog{ch: ch}

	vm := createRunning(t, m, "vm")
	l.expect(t, "vm", api.EventInstanceCreated, api.StateCreated)
	l.expect(t, "vm", api.EventInstanceState, api.StateRunning)
	action(t, m, "vm", "standby")
	l.expect(t, "vm", api.EventInstanceState, api.StateStandby)

	kid := fork(t, m, "vm", api.ForkRequest{Name: "kid"})
	ev := l.expect(t, "kid", api.EventInstanceForked, api.StateStandby)
	if ev.Instance.ID != kid.ID {
		t.Errorf("forked event names %s, want the fork %s", ev.Instance.ID, kid.ID)
	}
	for _, e := range l.got {
		if about("kid")(e) && e.State == api.StateForking {
			t.Errorf("an event showed the fork while it was being made: %+v", e)
		}
	}

	if _, err := m.CreateSnapshot(ctx, "vm", api.SnapshotRequest{Name: "snap"}); err != nil {
		t.Fatal(err)
	}
	l.expect(t, "snap", api.EventSnapshotCreated, "ready")

	// A failed operation that leaves a stable state is an error event.
	m.faults = map[string]error{"restore:record": errors.New("injected failure")}
	if _, err := m.Action(ctx, "vm", "restore", api.ActionRequest{}); err == nil {
		t.Fatal("restore with an injected failure succeeded")
	}
	m.faults = nil
	if ev := l.expect(t, "vm", api.EventInstanceError, ""); !strings.Contains(ev.Error, "injected failure") {
		t.Errorf("error event says %q, want the failure", ev.Error)
	}

	// A VMM that dies is a state change with the reason.
	action(t, m, "kid", "restore")
	l.expect(t, "kid", api.EventInstanceState, api.StateRunning)
	got, _ := m.GetInstance(ctx, "kid")
	if err := syscall.Kill(got.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if ev := l.expect(t, "kid", api.EventInstanceState, api.StateStopped); !strings.Contains(ev.Error, "SIGKILL") {
		t.Errorf("Stopped event says %q, want how the VMM ended", ev.Error)
	}

	if err := m.DeleteSnapshot(ctx, "snap"); err != nil {
		t.Fatal(err)
	}
	l.expect(t, "snap", api.EventSnapshotDeleted, "")
	if err := m.DeleteInstance(ctx, "kid"); err != nil {
		t.Fatal(err)
	}
	if ev := l.expect(t, "kid", api.EventInstanceDeleted, ""); ev.Instance.Name != "kid" {
		t.Errorf("deleted event names %q, want kid", ev.Instance.Name)
	}
	_ = vm
}

// A refused request (wrong state) is not news: no error event.
func TestRefusedRequestsAreNotErrorEvents(t *testing.T) {
	m := newTestManager(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, _ := m.Events(ctx)
	l := &eventLog{ch: ch}
	createRunning(t, m, "vm")
	l.expect(t, "vm", api.EventInstanceState, api.StateRunning)
	if _, err := m.Action(ctx, "vm", "restore", api.ActionRequest{}); !errors.Is(err, api.ErrInvalidState) {
		t.Fatalf("restore of a Running VM: %v, want ErrInvalidState", err)
	}
	action(t, m, "vm", "pause")
	l.expect(t, "vm", api.EventInstanceState, api.StatePaused)
	for _, ev := range l.got {
		if ev.Type == api.EventInstanceError {
			t.Fatalf("a refused request made an error event: %+v", ev)
		}
	}
}
