package store

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// The observer hears every committed record write, in order, and nothing
// of a write that failed or a group unit whose function failed.
func TestObserverHearsCommittedWritesOnly(t *testing.T) {
	s, _ := openTemp(t)
	var mu sync.Mutex
	var got []string
	s.Observe(func(c Change) {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case c.Instance != nil:
			got = append(got, string(c.Op)+" instance "+c.Instance.ID+" "+c.Instance.State)
		case c.Snapshot != nil:
			got = append(got, string(c.Op)+" snapshot "+c.Snapshot.ID+" "+c.Snapshot.State)
		}
	})
	ctx := context.Background()
	in := Instance{ID: "a1", Name: "a", State: "Running", CreatedAt: time.Now()}
	if err := s.CreateInstance(ctx, in); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateInstance(ctx, Instance{ID: "a2", Name: "a", CreatedAt: time.Now()}); err == nil {
		t.Fatal("a taken name was accepted")
	}
	in.State = "Standby"
	if err := s.UpdateInstance(ctx, in); err != nil {
		t.Fatal(err)
	}
	if err := s.Group(ctx, "unit", func(tx *Tx) error {
		in.State = "Stopped"
		return tx.UpdateInstance(in)
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.Group(ctx, "failing unit", func(tx *Tx) error {
		in.State = "Error"
		if err := tx.UpdateInstance(in); err != nil {
			return err
		}
		return errors.New("the unit fails after its write")
	}); err == nil {
		t.Fatal("a failing unit reported success")
	}
	sn := Snapshot{ID: "s1", Name: "s", State: "ready", CreatedAt: time.Now()}
	if err := s.CreateSnapshot(ctx, sn); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot(ctx, "s1"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteInstance(ctx, "a1"); err != nil {
		t.Fatal(err)
	}
	want := []string{"created instance a1 Running", "updated instance a1 Standby", "updated instance a1 Stopped",
		"created snapshot s1 ready", "deleted snapshot s1 ", "deleted instance a1 "}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != len(want) {
		t.Fatalf("observed %q, want %q", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("observed %q, want %q", got, want)
		}
	}
}
