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
	w, err := s.ReserveWarmSlot(ctx, 10)
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
	if w2, err := s.ReserveWarmSlot(ctx, 3); err != nil || w2 != 2 {
		t.Fatalf("next warm slot = %d, %v; want 2", w2, err)
	}
	if _, err := s.ReserveWarmSlot(ctx, 3); !errors.Is(err, ErrPoolExhausted) {
		t.Fatalf("warm slot in a full pool: %v, want ErrPoolExhausted", err)
	}
}
