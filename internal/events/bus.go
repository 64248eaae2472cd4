// Package events fans the daemon's events out to the clients streaming GET
// /events. Publishing never blocks and never queues without bound: each
// subscriber has a fixed buffer, and one that falls so far behind that its
// buffer is full is dropped (its channel closed) rather than holding up the
// publisher or growing the daemon's memory; it can reconnect and read the
// current state again. It knows nothing of what the events mean.
package events

import (
	"context"
	"sync"

	"github.com/forkd/forkd/internal/api"
)

// DefaultBuffer is how many events a subscriber may fall behind before it
// is dropped.
const DefaultBuffer = 1024

// Bus is one stream of events and its subscribers.
type Bus struct {
	buffer int

	mu   sync.Mutex
	subs map[*sub]struct{} // guarded by mu
}

type sub struct {
	ch chan api.Event // closed when the subscriber is dropped or leaves; guarded by Bus.mu
}

// New returns a bus whose subscribers may fall buffer events behind
// (DefaultBuffer when buffer <= 0).
func New(buffer int) *Bus {
	if buffer <= 0 {
		buffer = DefaultBuffer
	}
	return &Bus{buffer: buffer, subs: map[*sub]struct{}{}}
}

// Subscribe returns a channel of every event published from now on. It is
// closed when ctx ends or when the subscriber falls buffer events behind.
func (b *Bus) Subscribe(ctx context.Context) <-chan api.Event {
	s := &sub{ch: make(chan api.Event, b.buffer)}
	b.mu.Lock()
	b.subs[s] = struct{}{}
	b.mu.Unlock()
	context.AfterFunc(ctx, func() { b.drop(s) })
	return s.ch
}

// Publish hands ev to every subscriber without waiting for any of them.
func (b *Bus) Publish(ev api.Event) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for s := range b.subs {
		select {
		case s.ch <- ev:
		default:
			// Too far behind: drop it rather than block or queue without
			// bound. Its stream ends; it can reconnect.
			delete(b.subs, s)
			close(s.ch)
		}
	}
}

// Subscribers is how many subscribers the bus has now.
func (b *Bus) Subscribers() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.subs)
}

func (b *Bus) drop(s *sub) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.subs[s]; ok {
		delete(b.subs, s)
		close(s.ch)
	}
}
