package instance

import (
	"context"
	"errors"
	"time"

	"github.com/forkd/forkd/internal/store"
)

// The warm network pool. Making a VM's network (network.Host.Ensure) costs
// a few milliseconds of netlink and nftables work under the kernel's rtnl
// lock, on the order of a whole fork, and a burst of forks queues on that
// lock. So, as e2b keeps pre-made slots, the manager keeps Config.NetworkWarm
// networks made ahead of any VM: a networked create or fork takes a ready
// one in the same transaction as its record (store net_warm) and skips
// Ensure; a background loop makes the next.
//
// Crash story: a warm row is written (ready 0) before its network is made
// and marked ready after, so every warm network on the host has a row; the
// reconciler treats warm rows as records that hold their slot (makes the
// network whole, then marks it ready) and removes the rows and networks of
// a pool larger than configured, or of a daemon with no networked VM left.
// Crash points "warm:reserved" and "warm:ready" (journalSteps) have crash
// cases in internal/reliability.

// netOpStart marks a create or fork in flight; the returned func ends it and
// wakes the warm loop. The loop makes no network while one is in flight:
// a refill would compete with it for the CPU and the kernel's rtnl lock,
// so the pool refills between operations, never during a burst.
func (m *Manager) netOpStart() func() {
	if m.cfg.NetworkWarm <= 0 || m.net() == nil {
		return func() {}
	}
	m.netBusy.Add(1)
	return func() {
		m.netBusy.Add(-1)
		m.kickWarm()
	}
}

// kickWarm asks the warm loop to top the pool up (never blocks).
func (m *Manager) kickWarm() {
	if m.cfg.NetworkWarm <= 0 || m.net() == nil {
		return
	}
	select {
	case m.warmKick <- struct{}{}:
	default:
	}
}

// warmLoop owns refills: one at a time, so two never reserve for the same
// need. It stops with the manager.
func (m *Manager) warmLoop() {
	defer m.wg.Done()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-m.warmKick:
		}
		if err := m.fillWarm(m.ctx); err != nil && m.ctx.Err() == nil {
			m.log.Warn("network warm pool: refill", "err", err)
		}
	}
}

// fillWarm makes warm networks until the pool holds NetworkWarm (or the
// address pool is full).
func (m *Manager) fillWarm(ctx context.Context) error {
	m.warmMu.Lock()
	defer m.warmMu.Unlock()
	// A daemon that networks no VM makes no network, first thing: every
	// create and fork kicks this loop, networked or not, and without this
	// check each daemon with the defaults made 8 networks and the host
	// table in its namespace (for a test daemon, the host's own).
	if n, err := m.networkedCount(ctx); err != nil || n == 0 {
		return err // no VM is networked (any more): no pool
	}
	if err := m.netReady(ctx); err != nil {
		return err
	}
	for ctx.Err() == nil {
		if m.netBusy.Load() > 0 {
			return nil // the operation's end kicks again
		}
		ws, err := m.db.WarmSlots(ctx)
		if err != nil {
			return err
		}
		if len(ws) >= m.cfg.NetworkWarm {
			return nil
		}
		// The pool's writes wait for no fsync: a power cut that loses a
		// reservation leaves a network no record holds, which the
		// reconciler removes, and one that loses a ready mark leaves a row
		// the pool finishes again; a fork that takes the slot commits after
		// them and makes them durable with itself. So refilling after a
		// burst of networked forks costs no fsync, and makes no fork's
		// unsynced commits durable behind its back (fork).
		var slot int
		err = m.db.GroupUnsynced(ctx, "warm:reserving", func(tx *store.Tx) (err error) {
			slot, err = tx.ReserveWarmSlot(m.net().Config().Slots())
			return err
		})
		if errors.Is(err, store.ErrPoolExhausted) {
			return nil // every address is in use: nothing to warm
		}
		if err != nil {
			return err
		}
		crashPoint("warm", "reserved")
		if err := m.net().Ensure(slot); err != nil {
			m.net().Remove(slot)
			m.db.DeleteWarmSlot(ctx, slot)
			return err
		}
		if err := m.db.GroupUnsynced(ctx, "warm:readying", func(tx *store.Tx) error { return tx.SetWarmReady(slot) }); err != nil {
			return err
		}
		crashPoint("warm", "ready")
	}
	return nil
}

// networkedCount is how many instances are networked.
func (m *Manager) networkedCount(ctx context.Context) (int, error) {
	all, err := m.db.ListInstances(ctx)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, in := range all {
		if in.Networked {
			n++
		}
	}
	return n, nil
}

// dropIdleNetworking runs after a networked VM is deleted: if no VM is
// networked any more and no create or fork is in flight, the warm pool's
// networks and the host table go too, so a daemon leaves nothing on the
// host once it networks nothing (as at a restart, see reconcileNetwork).
// A warm row a concurrent create took first is not its to remove: a
// network is removed only with the row this call deleted.
func (m *Manager) dropIdleNetworking(ctx context.Context) error {
	h := m.net()
	if h == nil {
		return nil
	}
	m.warmMu.Lock()
	defer m.warmMu.Unlock()
	m.netState.mu.Lock()
	defer m.netState.mu.Unlock()
	if m.netBusy.Load() > 0 {
		return nil
	}
	if n, err := m.networkedCount(ctx); err != nil || n > 0 {
		return err
	}
	ws, err := m.db.WarmSlots(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, w := range ws {
		took, err := m.db.TakeWarmSlot(ctx, w.Slot)
		if err != nil || !took {
			errs = append(errs, err)
			continue
		}
		errs = append(errs, h.Remove(w.Slot))
	}
	errs = append(errs, h.RemoveHostTable())
	m.netState.ready = false
	return errors.Join(errs...)
}

// waitWarm waits until the warm pool holds n ready networks (tests and
// benchmarks that measure a fork with a warm pool).
func (m *Manager) waitWarm(ctx context.Context, n int) error {
	for {
		ws, err := m.db.WarmSlots(ctx)
		if err != nil {
			return err
		}
		ready := 0
		for _, w := range ws {
			if w.Ready {
				ready++
			}
		}
		if ready >= n {
			return nil
		}
		m.kickWarm()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond): // polling a condition, not a timing
		}
	}
}
