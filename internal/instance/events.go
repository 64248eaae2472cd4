package instance

import (
	"context"
	"sync"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/events"
	"github.com/forkd/forkd/internal/store"
)

// eventFeed turns committed record writes (store.Observe) into the API's
// events and publishes them on the bus GET /events streams. It remembers
// each record's last state to tell a state change from a rewrite, and hides
// what a client never sees: a create or fork still being made (Creating,
// Forking; a failed one vanishes without an event) and a snapshot still
// being written.
type eventFeed struct {
	bus *events.Bus

	mu    sync.Mutex
	insts map[string]seenInstance // guarded by mu
	snaps map[string]seenSnapshot // guarded by mu
}

type seenInstance struct{ name, state, errText, source string }
type seenSnapshot struct{ name, state string }

func newEventFeed() *eventFeed {
	return &eventFeed{bus: events.New(0), insts: map[string]seenInstance{}, snaps: map[string]seenSnapshot{}}
}

// Events subscribes to what happens from now on (api.Service).
func (m *Manager) Events(ctx context.Context) (<-chan api.Event, error) {
	return m.feed.bus.Subscribe(ctx), nil
}

// seed records the current records, so the first write of each is compared
// with what it really was.
func (f *eventFeed) seed(insts []store.Instance, snaps []store.Snapshot) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, in := range insts {
		f.insts[in.ID] = seenInstance{in.Name, in.State, in.Error, in.Source}
	}
	for _, sn := range snaps {
		f.snaps[sn.ID] = seenSnapshot{sn.Name, sn.State}
	}
}

func beingMade(state string) bool { return state == stateCreating || state == api.StateForking }

// observe is the store's observer: one committed write in, zero or one
// event out. It runs on the writer's goroutine and never blocks.
func (f *eventFeed) observe(c store.Change) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now().UTC()
	switch {
	case c.Instance != nil:
		in := c.Instance
		prev, known := f.insts[in.ID]
		if c.Op == store.Deleted {
			delete(f.insts, in.ID)
			if known && !beingMade(prev.state) {
				f.publish(api.Event{Time: now, Type: api.EventInstanceDeleted, Instance: &api.EventRef{ID: in.ID, Name: prev.name}})
			}
			return
		}
		f.insts[in.ID] = seenInstance{in.Name, in.State, in.Error, in.Source}
		ref := &api.EventRef{ID: in.ID, Name: in.Name}
		switch {
		case beingMade(in.State):
		case !known || beingMade(prev.state):
			typ := api.EventInstanceCreated
			if in.Source != "" {
				typ = api.EventInstanceForked
			}
			f.publish(api.Event{Time: now, Type: typ, Instance: ref, State: in.State, Error: in.Error})
		case in.State == api.StateError && (prev.state != api.StateError || prev.errText != in.Error):
			f.publish(api.Event{Time: now, Type: api.EventInstanceError, Instance: ref, State: in.State, Error: in.Error})
		case in.State != prev.state:
			f.publish(api.Event{Time: now, Type: api.EventInstanceState, Instance: ref, State: in.State, Error: in.Error})
		}
	case c.Snapshot != nil:
		sn := c.Snapshot
		prev, known := f.snaps[sn.ID]
		if c.Op == store.Deleted {
			delete(f.snaps, sn.ID)
			if known && prev.state != snapCreating {
				f.publish(api.Event{Time: now, Type: api.EventSnapshotDeleted, Snapshot: &api.EventRef{ID: sn.ID, Name: prev.name}})
			}
			return
		}
		f.snaps[sn.ID] = seenSnapshot{sn.Name, sn.State}
		ref := &api.EventRef{ID: sn.ID, Name: sn.Name}
		switch {
		case sn.State == snapCreating:
		case !known || prev.state == snapCreating:
			f.publish(api.Event{Time: now, Type: api.EventSnapshotCreated, Snapshot: ref, State: sn.State})
		case sn.State != prev.state:
			f.publish(api.Event{Time: now, Type: api.EventSnapshotState, Snapshot: ref, State: sn.State})
		}
	}
}

func (f *eventFeed) publish(ev api.Event) {
	if ev.Error == "" || (ev.Type != api.EventInstanceError && ev.State != api.StateStopped && ev.State != api.StateError) {
		ev.Error = "" // error is said only where it means something
	}
	f.bus.Publish(ev)
}

// failed publishes instance.error for an operation that failed without
// leaving the record to say so (a failed restore stays Standby, a failed
// standby Running), or for a guest that reports memory corruption.
func (m *Manager) failed(id, name, state string, err string) {
	m.feed.publish(api.Event{Time: time.Now().UTC(), Type: api.EventInstanceError,
		Instance: &api.EventRef{ID: id, Name: name}, State: state, Error: err})
}
