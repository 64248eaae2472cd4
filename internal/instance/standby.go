package instance

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/forkd/forkd/internal/capacity"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/store"
)

// standby parks a Running or Paused instance to disk (docs/architecture.md §5):
// pause → promote snapshot-base to snapshot-latest → unshare guard → Diff
// into it (Full when there is no base) → kill the VMM, close its pager
// session → record a new cache key. Caller holds the write lock.
func (m *Manager) standby(ctx context.Context, in *store.Instance, _ api.ActionRequest) error {
	if !oneOf(in.State, api.StateRunning, api.StatePaused) {
		return invalidState(*in, "standby", api.StateRunning, api.StatePaused)
	}
	g, err := m.guest(in.ID)
	if err != nil {
		return err
	}
	// A snapshot that cannot fit on disk fails here, before the VM is
	// paused or a byte written: the snapshot goes into the base if there is
	// one (promoted to latest), else into latest.
	into := g.Base()
	if _, err := os.Stat(into.Dir); err != nil {
		into = g.Latest()
	}
	release, err := m.reserveCapacity(ctx, "standby", capacity.Request{ID: in.ID, DiskBytes: m.snapshotCost(into, in.MemoryMiB)})
	if err != nil {
		return err
	}
	defer release()
	prev := in.State
	o, err := m.begin(ctx, "standby", in.ID, opPayload{Prev: prev})
	if err != nil {
		return err
	}
	in.State = api.StateStandingby
	if err := m.db.UpdateInstance(ctx, *in); err != nil {
		o.finish(ctx, err)
		return err
	}
	c := m.client(g)
	defer c.Close()
	paused, promoted := false, false
	latest, base := g.Latest(), g.Base()
	// fail undoes what standby did (a promoted base that was not written to
	// is demoted again, so the next standby is still a Diff; a VM it paused
	// is resumed) and leaves the instance in its previous state; the error
	// goes to the caller and the log, not the record (a Running or Paused
	// instance's error is ""). A VM that cannot be resumed is Error, with
	// the reason. Every undo step that fails is joined into the error.
	fail := func(err error) error {
		err = fmt.Errorf("standby %s: %w", in.Name, err)
		u := m.undo("standby", in.ID)
		if promoted {
			if _, serr := os.Stat(latest.Dir); serr == nil {
				u.do("demote the base again", atomicfile.Rename(latest.Dir, base.Dir))
			}
		}
		in.State, in.Error = prev, ""
		if paused {
			if rerr := c.Resume(ctx); rerr != nil {
				u.do("resume the VM", rerr)
				if m.stopIfVMMGone(ctx, in, "standby", rerr) {
					err = u.join(err)
					o.finish(ctx, err)
					return err
				}
				in.State, in.Error = api.StateError, u.join(err).Error()
			}
		}
		u.do("record its state again", m.db.UpdateInstance(ctx, *in))
		err = u.join(err)
		m.log.Warn("standby failed; instance back in its previous state", "instance", in.ID, "state", in.State, "err", err)
		o.finish(ctx, err)
		return err
	}
	if prev == api.StateRunning {
		if err := c.Pause(ctx); err != nil {
			return fail(err)
		}
		paused = true
	}
	in.MemoryCheck = m.memoryCheck(ctx, g)
	// A stale snapshot-latest (left by a failed restore's rename, say) is
	// older than the base: drop it, then promote the base.
	if _, err := os.Stat(base.Dir); err == nil {
		if err := os.RemoveAll(latest.Dir); err != nil {
			return fail(err)
		}
		if err := atomicfile.Rename(base.Dir, latest.Dir); err != nil {
			return fail(err)
		}
		promoted = true
	}
	if err := errors.Join(o.step(ctx, "promoted", nil), m.fault("standby:promoted")); err != nil {
		return fail(err)
	}
	if _, err := m.writeSnapshot(ctx, o, c, in.ID, latest); err != nil {
		return fail(err)
	}
	return m.finishStandby(ctx, o, in, g)
}

// finishStandby is standby after the snapshot is durable: kill the VMM,
// close the pager session, record the cache key. The reconciler runs it for
// a standby that crashed after step "created".
func (m *Manager) finishStandby(ctx context.Context, o *op, in *store.Instance, g guestdir.Guest) error {
	// The snapshot is durable: what follows cannot undo the standby, so a
	// failure here is logged (the reconciler's sweep kills a VMM no record
	// names at the next start) rather than turned back.
	if err := m.killVMM(ctx, in.ID, in.Pid, g); err != nil {
		m.log.Error("standby: kill vmm after the snapshot", "instance", in.ID, "err", err)
	}
	m.closeSession(ctx, in)
	if err := os.Remove(g.MappedPin()); err != nil && !errors.Is(err, os.ErrNotExist) { // the VMM that mapped it is gone
		m.log.Error("standby: remove the mapped pin", "instance", in.ID, "err", err)
	}
	key, err := cacheKey(g.Latest())
	if err != nil {
		// A restore computes a missing key.
		m.log.Error("standby: cache key of the new snapshot", "instance", in.ID, "err", err)
		key = ""
	}
	in.State, in.Pid, in.SnapshotCacheKey, in.Error = api.StateStandby, 0, key, ""
	err = m.db.UpdateInstance(ctx, *in)
	o.finish(ctx, err)
	if err != nil {
		return err
	}
	m.kickPrefetchGC() // the key it ran under may have been its last user's
	m.log.Info("instance on standby", "instance", in.ID, "cache_key", key)
	return nil
}

// writeSnapshot writes the paused VM's state into dir: a Diff into dir's
// existing mem-file (the instance's own base) or a Full into a new one. It is
// the only in-place writer of a mem-file in forkd, used by standby, snapshot
// of a running VM and live fork, so the base is always current (Firecracker
// resets its dirty log at every snapshot: a Diff written anywhere else would
// leave the base silently stale).
//
// On failure dir is removed: a partly written base must never be reused as
// a diff base (the next snapshot is then Full).
func (m *Manager) writeSnapshot(ctx context.Context, o *op, c *firecracker.Client, id string, dir guestdir.SnapDir) (string, error) {
	g, err := m.guest(id)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir.Dir, 0o755); err != nil {
		return "", err
	}
	typ := firecracker.SnapshotFull
	if _, err := os.Stat(dir.Memory()); err == nil {
		typ = firecracker.SnapshotDiff
		// Never diff-write a mem-file another VM maps: forks and the
		// snapshot store hardlink this inode, and Firecracker's Diff writes
		// dirty pages in place. If nlink > 1, replace it with a private copy
		// first; the other links keep the old inode and its bytes.
		if !m.cfg.DisableUnshareGuard {
			if err := m.pinMapped(id, dir); err != nil {
				return "", err
			}
			unshared, err := m.files.EnsureExclusive(dir.Memory())
			if err != nil {
				return "", fmt.Errorf("unshare %s: %w", dir.Memory(), err)
			}
			if unshared {
				m.log.Info("mem-file unshared before diff", "instance", id, "path", dir.Memory())
			}
		}
	}
	if err := o.step(ctx, "creating", nil); err != nil {
		return "", err
	}
	err = c.CreateSnapshot(ctx, firecracker.SnapshotCreate{SnapshotType: typ, SnapshotPath: g.InVMM(dir.VMState()), MemFilePath: g.InVMM(dir.Memory())})
	if err == nil {
		err = atomicfile.SyncDir(dir.Dir)
	}
	if err != nil {
		err = fmt.Errorf("%s snapshot into %s: %w", typ, dir.Dir, err)
		u := m.undo("snapshot write", id)
		u.do("remove the partial snapshot dir", os.RemoveAll(dir.Dir))
		return "", u.join(err)
	}
	if err := o.step(ctx, "created", nil); err != nil {
		return "", err
	}
	return typ, nil
}

// The pin (guestdir's MappedPin) is an extra link to the mem-file inode a
// running VMM maps, made when the unshare guard is about to rename a private
// copy over the name that VMM was restored from. Without it, the mapped inode
// would be left with only its siblings' links: a sibling seeing nlink 1 would
// diff-write it in place under the running VM (found by the reliability
// suite, TestNoVMWritesAnInodeARunningSiblingMaps). Standby removes it once
// the VMM is killed; stop, delete and a dead-VMM settle remove it with the
// snapshots dir.
//
// pinMapped links dir's mem-file to the pin if the guard is about to
// unshare it (nlink > 1) and no pin exists yet (with one, the VMM maps the
// pinned inode, not this one).
func (m *Manager) pinMapped(id string, dir guestdir.SnapDir) error {
	st, err := os.Stat(dir.Memory())
	if err != nil {
		return nil // no base: a Full snapshot into a new file
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); !ok || sys.Nlink <= 1 {
		return nil
	}
	g, err := m.guest(id)
	if err != nil {
		return err
	}
	if _, err := os.Lstat(g.MappedPin()); err == nil {
		return nil
	}
	if err := os.Link(dir.Memory(), g.MappedPin()); err != nil {
		return fmt.Errorf("pin the mapped mem-file of %s: %w", id, err)
	}
	return nil
}
