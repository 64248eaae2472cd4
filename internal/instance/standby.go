package instance

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/capacity"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/hostpath"
	"github.com/forkd/forkd/internal/memfile"
	"github.com/forkd/forkd/internal/store"
	"golang.org/x/sys/unix"
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
			if _, serr := os.Lstat(latest.Dir); serr == nil {
				u.do("demote the base again", m.renameInGuest(g, latest.Dir, base.Dir))
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
	if _, err := os.Lstat(base.Dir); err == nil {
		if err := m.removeInGuest(g, latest.Dir); err != nil {
			return fail(err)
		}
		if err := m.renameInGuest(g, base.Dir, latest.Dir); err != nil {
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
	killErr := m.killVMM(ctx, in.ID, in.Pid, g)
	if killErr != nil {
		m.log.Error("standby: kill vmm after the snapshot", "instance", in.ID, "err", killErr)
	}
	m.closeSession(ctx, in)
	if err := m.removeInGuest(g, g.MappedPin()); err != nil { // the VMM that mapped it is gone
		m.log.Error("standby: remove the mapped pin", "instance", in.ID, "err", err)
	}
	// No VMM can write the snapshot or the disk any more: seal them, so
	// forks and the store may link them. (Unsealed, after a failed kill, they clone it.)
	if killErr == nil {
		if err := sealSnapDir(g, g.Latest()); err != nil {
			m.log.Error("standby: seal the snapshot (forks will copy it)", "instance", in.ID, "err", err)
		}
		if err := sealDisk(g); err != nil {
			m.log.Error("standby: seal the disk (forks will copy it)", "instance", in.ID, "err", err)
		}
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
//
// The VMM is alive throughout and owns the guest dir: every name there is
// reached through a handle opened with no symlink below the instance's
// level, and what the VMM will write (the dir, the base it diffs into) is
// given to its uid only once it is a private inode.
func (m *Manager) writeSnapshot(ctx context.Context, o *op, c *firecracker.Client, id string, dir guestdir.SnapDir) (string, error) {
	g, err := m.guest(id)
	if err != nil {
		return "", err
	}
	d, err := m.openSnapDir(g, dir)
	if err != nil {
		return "", err
	}
	defer d.Close()
	uid := m.vmmUID(id)
	typ := firecracker.SnapshotFull
	mem := filepath.Base(dir.Memory())
	fd, err := unix.Openat(int(d.Fd()), mem, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	switch {
	case err == nil:
		unix.Close(fd)
		typ = firecracker.SnapshotDiff
		// Never diff-write a mem-file another VM maps: forks and the
		// snapshot store hardlink this inode, and Firecracker's Diff writes
		// dirty pages in place. If nlink > 1, replace it with a private copy
		// first; the other links keep the old inode and its bytes.
		if !m.cfg.DisableUnshareGuard {
			if err := m.pinMapped(id, dir); err != nil {
				return "", err
			}
			unshared, err := m.files.EnsureExclusiveAt(d, mem)
			if err != nil {
				return "", fmt.Errorf("unshare %s: %w", dir.Memory(), err)
			}
			if unshared {
				m.log.Info("mem-file unshared before diff", "instance", id, "path", dir.Memory())
			}
		}
		// The VMM writes its Diff into this inode: it becomes the VMM's,
		// and it has exactly one link (giveFile refuses another).
		fd, err = unix.Openat(int(d.Fd()), mem, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err != nil {
			return "", fmt.Errorf("diff base %s: %w", dir.Memory(), err)
		}
		f := os.NewFile(uintptr(fd), dir.Memory())
		_, err = giveFile("diff base", f, uid, m.cfg.DisableUnshareGuard)
		f.Close()
		if err != nil {
			return "", err
		}
	case !errors.Is(err, unix.ENOENT):
		return "", fmt.Errorf("diff base %s: %w", dir.Memory(), err)
	}
	// Never let a VMM rewrite a vmstate another VM links (the vmstate
	// guard): forks and the store link the vmstate they only read, and
	// Firecracker's snapshot create opens the vmstate path with
	// create|write|truncate and writes it in place. So the path must name
	// no inode when the VMM opens it: unlink it, and the VMM makes a new
	// inode while the links keep the old bytes. (Unlike the mem-file, whose
	// Diff writes into the existing file and so needs the private copy
	// above, the vmstate is written whole.) The unlink is made durable with
	// the snapshot (the dir's fsync below); a crash before that drops this
	// dir anyway. Sealing (inodes.go) is the second line: a jailed VMM could
	// not open a sealed vmstate for writing, an unjailed one (root) could.
	if !m.cfg.DisableVMStateGuard {
		if err := unix.Unlinkat(int(d.Fd()), filepath.Base(dir.VMState()), 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return "", fmt.Errorf("snapshot into %s: remove the old vmstate: %w", dir.Dir, err)
		}
	}
	if err := d.Chown(uid, uid); err != nil {
		return "", fmt.Errorf("snapshot into %s: %w", dir.Dir, err)
	}
	if err := o.step(ctx, "creating", nil); err != nil {
		return "", err
	}
	err = c.CreateSnapshot(ctx, firecracker.SnapshotCreate{SnapshotType: typ, SnapshotPath: g.InVMM(dir.VMState()), MemFilePath: g.InVMM(dir.Memory())})
	if err == nil {
		err = d.Sync()
	}
	if err != nil {
		err = fmt.Errorf("%s snapshot into %s: %w", typ, dir.Dir, err)
		u := m.undo("snapshot write", id)
		u.do("remove the partial snapshot dir", m.removeInGuest(g, dir.Dir))
		return "", u.join(err)
	}
	if err := o.step(ctx, "created", nil); err != nil {
		return "", err
	}
	return typ, nil
}

// openSnapDir makes (if missing) and opens one of g's snapshot dirs with no
// symlink anywhere below g's <id> level. A VMM that owns the guest dir may
// have put anything there: making the dirs goes through os.Root (nothing
// made outside the guest dir), opening refuses every link.
func (m *Manager) openSnapDir(g guestdir.Guest, dir guestdir.SnapDir) (*os.File, error) {
	rel, err := filepath.Rel(g.Dir, dir.Dir)
	if err != nil || strings.HasPrefix(rel, "..") {
		return nil, fmt.Errorf("snapshot dir %s is not in %s", dir.Dir, g.Dir)
	}
	root, err := os.OpenRoot(g.Dir)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	if err := root.MkdirAll(rel, 0o755); err != nil {
		return nil, fmt.Errorf("snapshot dir %s: %w", dir.Dir, err)
	}
	return hostpath.OpenDirBeneath("snapshot dir", g.Jail, dir.Dir)
}

// removeInGuest removes path (a file or tree in g's guest dir) by name,
// through os.Root: a VMM-made symlink on the way never sends the removal
// outside the guest dir.
func (m *Manager) removeInGuest(g guestdir.Guest, path string) error {
	rel, err := filepath.Rel(g.Dir, path)
	if err != nil || rel == "." || strings.HasPrefix(rel, "..") {
		return fmt.Errorf("remove %s: not inside %s", path, g.Dir)
	}
	root, err := os.OpenRoot(g.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer root.Close()
	if err := root.RemoveAll(rel); err != nil {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return nil
}

// renameInGuest renames one name of g's guest dir to another, through
// os.Root (neither end is followed if it is a symlink, and neither leaves
// the guest dir), and fsyncs the directories involved.
func (m *Manager) renameInGuest(g guestdir.Guest, from, to string) error {
	rf, err1 := filepath.Rel(g.Dir, from)
	rt, err2 := filepath.Rel(g.Dir, to)
	if err1 != nil || err2 != nil || strings.HasPrefix(rf, "..") || strings.HasPrefix(rt, "..") {
		return fmt.Errorf("rename %s to %s: not inside %s", from, to, g.Dir)
	}
	root, err := os.OpenRoot(g.Dir)
	if err != nil {
		return err
	}
	defer root.Close()
	if err := root.Rename(rf, rt); err != nil {
		return fmt.Errorf("rename %s to %s: %w", from, to, err)
	}
	for _, d := range []string{filepath.Dir(rf), filepath.Dir(rt)} {
		f, err := root.Open(d)
		if err != nil {
			return err
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return err
		}
	}
	return nil
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
	g, err := m.guest(id)
	if err != nil {
		return err
	}
	f, err := hostpath.OpenBeneath("mem-file", g.Jail, dir.Memory())
	if err != nil {
		return nil // no base: a Full snapshot into a new file
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Nlink <= 1 {
		return nil
	}
	snaps, err := hostpath.OpenDirBeneath("snapshots dir", g.Jail, g.SnapshotsDir())
	if err != nil {
		return err
	}
	defer snaps.Close()
	// The inode has other links, so it is sealed (inodes.go): a second
	// name in the guest dir gives the VMM nothing it could write.
	err = memfile.LinkFileAt(f, snaps, filepath.Base(g.MappedPin()))
	if errors.Is(err, fs.ErrExist) {
		return nil // pinned already: the VMM maps the pinned inode
	}
	if err != nil {
		return fmt.Errorf("pin the mapped mem-file of %s: %w", id, err)
	}
	return nil
}
