package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

func netInstance(i int) Instance {
	return Instance{ID: fmt.Sprintf("%024x", i), Name: fmt.Sprintf("vm-%d", i), State: "Created", Vcpus: 1, MemoryMiB: 32,
		CreatedAt: time.Now(), NetGuest: "169.254.0.20/30", NetMAC: "02:fc:00:00:00:05"}
}

// TestNetworkSlotsAreLowestFreeAndUnique allocates concurrently, frees one
// slot and checks the next allocation takes it; a plain instance holds none.
func TestNetworkSlotsAreLowestFreeAndUnique(t *testing.T) {
	ctx := context.Background()
	s, _ := openTemp(t)
	var wg sync.WaitGroup
	slots := make([]int, 6)
	for i := range slots {
		wg.Add(1)
		go func() {
			defer wg.Done()
			in := netInstance(i)
			if err := s.CreateNetworkedInstance(ctx, &in, 10, nil); err != nil {
				t.Error(err)
			}
			slots[i] = in.NetSlot
		}()
	}
	wg.Wait()
	seen := map[int]bool{}
	for _, sl := range slots {
		if seen[sl] || sl < 0 || sl >= 6 {
			t.Fatalf("slots %v: want 0-5, each once", slots)
		}
		seen[sl] = true
	}
	plain := netInstance(100)
	if err := s.CreateInstance(ctx, plain); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.GetInstance(ctx, plain.ID); got.Networked {
		t.Fatalf("a plain instance reads back networked (slot %d)", got.NetSlot)
	}
	victim := netInstance(3)
	got, _ := s.GetInstance(ctx, victim.ID)
	if err := s.DeleteInstance(ctx, victim.ID); err != nil {
		t.Fatal(err)
	}
	in := netInstance(7)
	if err := s.CreateNetworkedInstance(ctx, &in, 10, nil); err != nil || in.NetSlot != got.NetSlot {
		t.Fatalf("after freeing slot %d the next allocation got %d (%v)", got.NetSlot, in.NetSlot, err)
	}
	if back, _ := s.GetInstance(ctx, in.ID); !back.Networked || back.NetSlot != in.NetSlot || back.NetMAC != in.NetMAC {
		t.Fatalf("read back %+v", back)
	}
}

// TestPoolExhaustedAndPortTakenLeaveNothing: both refusals are their
// sentinel, and neither leaves a row or a publish behind.
func TestPoolExhaustedAndPortTakenLeaveNothing(t *testing.T) {
	ctx := context.Background()
	s, _ := openTemp(t)
	a := netInstance(1)
	if err := s.CreateNetworkedInstance(ctx, &a, 1, []Publish{{HostPort: 8080, GuestPort: 80, Protocol: "tcp"}}); err != nil {
		t.Fatal(err)
	}
	b := netInstance(2)
	if err := s.CreateNetworkedInstance(ctx, &b, 1, nil); !errors.Is(err, ErrPoolExhausted) {
		t.Fatalf("second VM in a one-slot pool: %v, want ErrPoolExhausted", err)
	}
	c := netInstance(3)
	if err := s.CreateNetworkedInstance(ctx, &c, 5, []Publish{{HostIP: "127.0.0.1", HostPort: 8080, GuestPort: 81, Protocol: "tcp"}}); !errors.Is(err, ErrPortTaken) {
		t.Fatalf("publish of a taken port: %v, want ErrPortTaken", err)
	}
	d := netInstance(4)
	if err := s.CreateNetworkedInstance(ctx, &d, 5, []Publish{{HostPort: 8080, GuestPort: 80, Protocol: "udp"}}); err != nil {
		t.Fatalf("same port, other protocol: %v", err)
	}
	all, _ := s.ListInstances(ctx)
	if len(all) != 2 {
		t.Fatalf("%d instances after two refusals, want 2", len(all))
	}
	if err := s.DeleteInstance(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	pubs, _ := s.Publishes(ctx)
	if len(pubs) != 1 || len(pubs[d.ID]) != 1 {
		t.Fatalf("publishes after deleting the first VM: %v, want only the udp one", pubs)
	}
}

// TestWarmSlotsAreTakenOnlyWhenReady: a warm slot being made is held (no
// instance gets it) but not handed out; once ready, the next networked
// instance takes it and the warm row goes, in one transaction.
func TestWarmSlotsAreTakenOnlyWhenReady(t *testing.T) {
	ctx := context.Background()
	s, _ := openTemp(t)
	w, err := reserveWarm(ctx, s, 10)
	if err != nil || w != 0 {
		t.Fatalf("first warm slot = %d, %v; want 0", w, err)
	}
	a := netInstance(1)
	if err := s.CreateNetworkedInstance(ctx, &a, 10, nil); err != nil || a.NetSlot != 1 || a.NetWarm {
		t.Fatalf("with warm slot 0 not ready, an instance got slot %d (warm %v, %v); want 1, not warm", a.NetSlot, a.NetWarm, err)
	}
	if err := s.SetWarmReady(ctx, w); err != nil {
		t.Fatal(err)
	}
	b := netInstance(2)
	if err := s.CreateNetworkedInstance(ctx, &b, 10, nil); err != nil || b.NetSlot != 0 || !b.NetWarm {
		t.Fatalf("with warm slot 0 ready, an instance got slot %d (warm %v, %v); want 0, warm", b.NetSlot, b.NetWarm, err)
	}
	if ws, _ := s.WarmSlots(ctx); len(ws) != 0 {
		t.Fatalf("warm slots after the take: %v, want none", ws)
	}
	if w2, err := reserveWarm(ctx, s, 3); err != nil || w2 != 2 {
		t.Fatalf("next warm slot = %d, %v; want 2", w2, err)
	}
	if _, err := reserveWarm(ctx, s, 3); !errors.Is(err, ErrPoolExhausted) {
		t.Fatalf("warm slot in a full pool: %v, want ErrPoolExhausted", err)
	}
}

// TestRestoreNetworkedInstanceTakesItsOwnSlotOnly: a networked record
// restored (from a fork's directory) gets back the very slot and publishes
// it held, taking the slot from the warm pool if a warm row holds it, and is
// refused, leaving nothing behind, when another instance holds the slot or
// a port, or the slot is outside the pool.
func TestRestoreNetworkedInstanceTakesItsOwnSlotOnly(t *testing.T) {
	ctx := context.Background()
	s, _ := openTemp(t)
	held := netInstance(1)
	if err := s.CreateNetworkedInstance(ctx, &held, 10, []Publish{{HostPort: 8080, GuestPort: 80, Protocol: "tcp"}}); err != nil {
		t.Fatal(err)
	}
	w, err := reserveWarm(ctx, s, 10)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetWarmReady(ctx, w); err != nil {
		t.Fatal(err)
	}
	lost := func(slot int) Instance {
		in := netInstance(2)
		in.State, in.Networked, in.NetSlot = "Standby", true, slot
		return in
	}
	for _, tc := range []struct {
		name string
		in   Instance
		pubs []Publish
		want error
	}{
		{"a slot another instance holds", lost(held.NetSlot), nil, ErrSlotTaken},
		{"a slot outside the pool", lost(10), nil, ErrSlotTaken},
		{"a port another instance publishes", lost(5), []Publish{{HostPort: 8080, GuestPort: 81, Protocol: "tcp"}}, ErrPortTaken},
	} {
		if err := s.RestoreNetworkedInstance(ctx, tc.in, 10, tc.pubs); !errors.Is(err, tc.want) {
			t.Fatalf("%s: %v, want %v", tc.name, err, tc.want)
		}
		if _, err := s.GetInstance(ctx, tc.in.ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("%s: refused, yet the record is there (%v)", tc.name, err)
		}
	}
	if ws, _ := s.WarmSlots(ctx); len(ws) != 1 {
		t.Fatalf("the refusals changed the warm pool: %v", ws)
	}
	// The slot of a warm row: the fork had taken it, and takes it again.
	in := lost(w)
	pubs := []Publish{{HostPort: 9090, GuestPort: 90, Protocol: "udp"}}
	if err := s.RestoreNetworkedInstance(ctx, in, 10, pubs); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetInstance(ctx, in.ID)
	if err != nil || !got.Networked || got.NetSlot != w || got.State != "Standby" {
		t.Fatalf("restored record %+v, %v; want networked at slot %d, Standby", got, err, w)
	}
	if p, _ := s.InstancePublishes(ctx, in.ID); len(p) != 1 || p[0] != pubs[0] {
		t.Fatalf("restored publishes %v, want %v", p, pubs)
	}
	if ws, _ := s.WarmSlots(ctx); len(ws) != 0 {
		t.Fatalf("warm rows after the restore took slot %d: %v, want none", w, ws)
	}
	next := netInstance(3)
	if err := s.CreateNetworkedInstance(ctx, &next, 10, nil); err != nil || next.NetSlot == w || next.NetSlot == held.NetSlot {
		t.Fatalf("the next instance got slot %d (%v), one already held", next.NetSlot, err)
	}
}

// reserveWarm reserves a warm slot in a group of its own, as the pool does.
func reserveWarm(ctx context.Context, s *Store, slots int) (slot int, err error) {
	err = s.Group(ctx, "warm", func(tx *Tx) (err error) {
		slot, err = tx.ReserveWarmSlot(slots)
		return err
	})
	return slot, err
}
