package instance

import (
	"context"
	"testing"

	"github.com/forkd/forkd/internal/api"
)

// TestDaemonThatNetworksNoVMMakesNoNetwork: a daemon that can network
// (a network Host, the default warm pool of 8) but whose VMs have no
// network makes no network at all: creates, starts and forks of VMs without
// one never fill the warm pool or make the host table. The warm pool once
// filled itself after every create or fork, networked or not, so every
// test daemon started in the host's namespace with the default settings
// left 8 veths of the default pool there. The twin: a networked VM on the
// same daemon does get its network and the pool, so the count below can
// see them.
func TestDaemonThatNetworksNoVMMakesNoNetwork(t *testing.T) {
	var env netEnv
	m := newTestManager(t, withNetwork(t, &env, ""), func(c *Config) { c.NetworkWarm = 8 })
	ctx := context.Background()
	_, _, tables0 := nsCounts(t, env.ns)

	a, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "a", MemoryMiB: testMemMiB, BootArgs: testBootArgs})
	if err != nil {
		t.Fatal(err)
	}
	off := false
	if _, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "idle", MemoryMiB: testMemMiB, Start: &off}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.ForkInstance(ctx, a.ID, api.ForkRequest{Name: "live", FromRunning: true, TargetState: api.StateRunning}); err != nil {
		t.Fatal(err)
	}
	// What the kicked warm loop runs (it holds the same lock, so this also
	// waits for a refill in progress).
	if err := m.fillWarm(ctx); err != nil {
		t.Fatal(err)
	}
	if p, err := env.host.Present(); err != nil || len(p) != 0 {
		t.Errorf("a daemon whose VMs have no network made networks %v (%v); want none", p, err)
	}
	if ws, err := m.db.WarmSlots(ctx); err != nil || len(ws) != 0 {
		t.Errorf("warm slots %v (%v) on a daemon that networks no VM; want none", ws, err)
	}
	if _, _, tables := nsCounts(t, env.ns); tables != tables0 {
		t.Errorf("%d nftables tables in the daemon's namespace, want %d: no host table without a networked VM", tables, tables0)
	}

	// The twin: one networked VM, and its network and the pool appear.
	if _, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "net", MemoryMiB: testMemMiB, Network: netOn(), Start: &off}); err != nil {
		t.Fatal(err)
	}
	if err := m.fillWarm(ctx); err != nil {
		t.Fatal(err)
	}
	if p, err := env.host.Present(); err != nil || len(p) != 1+8 {
		t.Errorf("with one networked VM and a pool of 8: networks %v (%v), want 9", p, err)
	}
	if _, _, tables := nsCounts(t, env.ns); tables != tables0+1 {
		t.Errorf("%d nftables tables with a networked VM, want %d (the host table)", tables, tables0+1)
	}
	if err := m.DeleteInstance(ctx, "net"); err != nil {
		t.Fatal(err)
	}
	if p, err := env.host.Present(); err != nil || len(p) != 0 {
		t.Errorf("after the only networked VM is deleted: networks %v (%v), want none", p, err)
	}
}
