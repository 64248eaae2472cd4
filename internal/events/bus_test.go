package events

import (
	"context"
	"testing"

	"github.com/forkd/forkd/internal/api"
)

// Every subscriber gets every event, in order.
func TestSubscribersGetEveryEventInOrder(t *testing.T) {
	b := New(8)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, c := b.Subscribe(ctx), b.Subscribe(ctx)
	for _, ty := range []string{"one", "two", "three"} {
		b.Publish(api.Event{Type: ty})
	}
	for _, ch := range []<-chan api.Event{a, c} {
		for _, want := range []string{"one", "two", "three"} {
			if got := <-ch; got.Type != want {
				t.Fatalf("got %q, want %q", got.Type, want)
			}
		}
	}
}

// A subscriber that does not read is dropped once its buffer is full: the
// publisher never blocks, the others still get everything, and the slow
// one's channel ends after what it could hold.
func TestASlowSubscriberIsDroppedNotWaitedFor(t *testing.T) {
	b := New(2)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	slow, fast := b.Subscribe(ctx), b.Subscribe(ctx)
	got := 0
	for i := 0; i < 5; i++ {
		b.Publish(api.Event{Type: "e"}) // never blocks
		<-fast
		got++
	}
	if got != 5 {
		t.Fatalf("the reading subscriber got %d of 5", got)
	}
	n := 0
	for range slow {
		n++
	}
	if n != 2 {
		t.Fatalf("the slow subscriber got %d events before its stream ended, want its buffer's 2", n)
	}
	if b.Subscribers() != 1 {
		t.Fatalf("%d subscribers after the slow one was dropped, want 1", b.Subscribers())
	}
}

// Leaving (ctx ends) closes the channel and unsubscribes.
func TestLeavingClosesTheStream(t *testing.T) {
	b := New(2)
	ctx, cancel := context.WithCancel(context.Background())
	ch := b.Subscribe(ctx)
	cancel()
	for range ch {
	}
	if b.Subscribers() != 0 {
		t.Fatalf("%d subscribers after leaving, want 0", b.Subscribers())
	}
	b.Publish(api.Event{Type: "after"}) // no panic on a closed channel
}
