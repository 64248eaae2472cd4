package instance

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/forkd/forkd/internal/capacity"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/store"
)

// Snapshot states.
const (
	snapCreating    = "creating" // record made, files not yet in place (reconciler removes)
	snapReady       = "ready"
	snapCompressing = "compressing"
	snapCompressed  = "compressed"
	// snapBroken: its directory is gone or incomplete (found by the
	// reconciler, or by a fork); it is listed so the user sees it, refuses
	// forks, and can only be deleted.
	snapBroken = "broken"
)

// CreateSnapshot copies an instance's memory into the immutable store
// (docs/architecture.md §5). From a Running/Paused instance, without restarting its
// VMM: pause, bring its own base up to date in place (writeSnapshot: unshare,
// Diff; Full when it has none), hardlink the base's mem-file and copy its
// vmstate (plus kernel and disk) into the store, resume. From a Standby
// instance: the same from snapshot-latest, under the read lock.
func (m *Manager) CreateSnapshot(ctx context.Context, ref string, req api.SnapshotRequest) (api.Snapshot, error) {
	start := time.Now()
	defer m.observe("snapshot", start)
	ctx = context.WithoutCancel(ctx)
	if req.Compression == "" {
		req.Compression = "none"
	}
	if req.Compression != "none" && req.Compression != "zstd" {
		return api.Snapshot{}, fmt.Errorf("%w: compression %q: want none or zstd", api.ErrInvalid, req.Compression)
	}
	probe, err := m.resolveInstance(ctx, ref)
	if err != nil {
		return api.Snapshot{}, apiErr(err)
	}
	live := oneOf(probe.State, api.StateRunning, api.StatePaused)
	in, unlock, err := m.lockResolved(ctx, probe, live)
	if err != nil {
		return api.Snapshot{}, err
	}
	defer unlock()
	if live != oneOf(in.State, api.StateRunning, api.StatePaused) || (!live && in.State != api.StateStandby) {
		return api.Snapshot{}, invalidState(in, "snapshot", api.StateRunning, api.StatePaused, api.StateStandby)
	}
	id := newID()
	if req.Name == "" {
		req.Name = id // an unnamed snapshot is named by its own id
	} else if err := validName("snapshot", req.Name); err != nil {
		return api.Snapshot{}, err
	}
	g, err := m.guest(in.ID)
	if err != nil {
		return api.Snapshot{}, err
	}
	sd, err := m.layout.Snapshot(id)
	if err != nil {
		return api.Snapshot{}, err
	}
	cost := m.diskShareCost(g.Rootfs()) // the store's copy of the disk (none if linked); the mem-file is a link
	if live {
		cost += m.snapshotCost(g.Base(), in.MemoryMiB)
	}
	release, err := m.reserveCapacity(ctx, "snapshot", capacity.Request{ID: in.ID, DiskBytes: cost})
	if err != nil {
		return api.Snapshot{}, err
	}
	defer release()
	o, err := m.begin(ctx, "snapshot", id, opPayload{Source: in.ID, Live: live, Prev: in.State})
	if err != nil {
		return api.Snapshot{}, err
	}
	rec := store.Snapshot{
		ID: id, Name: req.Name, SourceInstance: in.ID, CreatedAt: time.Now().UTC(), Compression: "none",
		State: snapCreating, MemoryMiB: in.MemoryMiB, Vcpus: in.Vcpus, Kernel: in.Kernel, BootArgs: in.BootArgs,
		NetGuest: in.NetGuest, NetMAC: in.NetMAC,
		Image:     in.Image,
		VsockCID:  in.VsockCID,
		HugePages: in.HugePages,
	}
	if err := m.db.CreateSnapshot(ctx, rec); err != nil {
		o.finish(ctx, err)
		return api.Snapshot{}, apiErr(err)
	}
	fail := func(err error) (api.Snapshot, error) {
		err = fmt.Errorf("snapshot %s of %s: %w", req.Name, in.Name, err)
		u := m.undo("snapshot", id)
		if derr := m.db.DeleteSnapshot(ctx, id); derr != nil && !errors.Is(derr, store.ErrNotFound) {
			u.do("delete the snapshot's record", derr)
		}
		if tmp, terr := m.layout.TempSnapshot(id); terr == nil {
			u.do("remove the partial snapshot dir", os.RemoveAll(tmp.Dir))
		}
		m.forgetSnapshot(id)
		err = u.join(err)
		o.finish(ctx, err)
		return api.Snapshot{}, err
	}
	if err := m.fault("snapshot:recorded"); err != nil {
		return fail(err)
	}
	from := g.Latest()
	if live {
		key, err := m.updateBaseLive(ctx, o, &in, func() error { return m.storeFiles(g, g.Base(), id) })
		if err != nil {
			return fail(err)
		}
		rec.SnapshotCacheKey = key
	} else {
		if err := m.storeFiles(g, from, id); err != nil {
			return fail(err)
		}
		rec.SnapshotCacheKey = in.SnapshotCacheKey
	}
	if err := o.step(ctx, "stored", nil); err != nil {
		return fail(err)
	}
	rec.SizeBytes = dirBytes(sd)
	// Ready, or compressing, in one update: the moment the record is
	// visible another client may delete it, so a second update (to
	// compressing) could find it gone and fail a snapshot that was made
	// (found by the stress test).
	rec.State = snapReady
	if req.Compression == "zstd" {
		rec.Compression, rec.State = "zstd", snapCompressing
	}
	if err := m.db.UpdateSnapshot(ctx, rec); err != nil {
		return fail(err)
	}
	o.finish(ctx, nil)
	m.log.Info("snapshot created", "snapshot", id, "name", req.Name, "instance", in.ID, "live", live, "cache_key", rec.SnapshotCacheKey)
	if rec.State == snapCompressing {
		m.startCompression(rec)
	}
	return snapshotAPI(rec), nil
}

// updateBaseLive pauses a Running/Paused instance, brings its own base up to
// date in place (writeSnapshot), runs use on the fresh base while the VM is
// still paused, and resumes it. The VMM never restarts. It returns the base's
// new cache key, which it also records on the instance. Caller holds the
// instance's write lock.
func (m *Manager) updateBaseLive(ctx context.Context, o *op, in *store.Instance, use func() error) (string, error) {
	g, err := m.guest(in.ID)
	if err != nil {
		return "", err
	}
	c := m.client(g)
	defer c.Close()
	wasRunning := in.State == api.StateRunning
	if wasRunning {
		if err := c.Pause(ctx); err != nil {
			return "", fmt.Errorf("pause %s: %w", in.Name, err)
		}
	}
	if err := o.step(ctx, "paused", nil); err != nil {
		return "", err
	}
	resume := func(err error) error {
		if !wasRunning {
			return err
		}
		u := m.undo("live snapshot", in.ID)
		if rerr := c.Resume(ctx); rerr != nil {
			u.do("resume "+in.Name, rerr)
			if m.stopIfVMMGone(ctx, in, "a live snapshot", rerr) {
				return u.join(err)
			}
			in.State, in.Error = api.StateError, u.join(err).Error()
			u.do("record Error", m.db.UpdateInstance(ctx, *in))
		}
		return u.join(err)
	}
	if _, err := m.writeSnapshot(ctx, o, c, in.ID, g.Base()); err != nil {
		return "", resume(err)
	}
	key, err := cacheKey(g.Base())
	if err != nil {
		return "", resume(err)
	}
	in.SnapshotCacheKey = key
	if err := m.db.UpdateInstance(ctx, *in); err != nil {
		return "", resume(err)
	}
	if err := use(); err != nil {
		return "", resume(err)
	}
	if err := resume(nil); err != nil {
		return "", err
	}
	return key, nil
}

// storeFiles builds snapshot id in a temp dir from a guest's snapshot dir
// (link the mem-file, vmstate, kernel and disk when sealed, else clone
// them; write meta.json) and renames it into place.
func (m *Manager) storeFiles(g guestdir.Guest, from guestdir.SnapDir, id string) error {
	tmp, err := m.layout.TempSnapshot(id)
	if err != nil {
		return err
	}
	final, _ := m.layout.Snapshot(id)
	if err := os.MkdirAll(tmp.Dir, 0o755); err != nil {
		return err
	}
	// The store and the instance now share the mem-file inode (when it is
	// sealed: a Standby source's; a running source's fresh base, which its
	// VMM may still write, is cloned instead). Safe: the store never writes
	// it, and the instance unshares before its next diff. Every file of the
	// store is sealed.
	root, err := m.openDataRoot()
	if err != nil {
		return err
	}
	defer root.Close()
	res, err := m.shareFrom(dataSources{root}, "mem-file", from.Memory(), tmp.Memory(), true)
	if err != nil {
		return err
	}
	m.countFallback(res, "snapshot", id)
	// The vmstate too: it is only read, and its one writer, the source's
	// next snapshot create, writes a new inode (the vmstate guard).
	if _, err := m.shareFrom(dataSources{root}, "vmstate", from.VMState(), tmp.VMState(), true); err != nil {
		return err
	}
	if _, err := os.Lstat(g.Kernel()); err == nil {
		if _, err := m.shareFrom(dataSources{root}, "kernel", g.Kernel(), tmp.Kernel(), true); err != nil { // never written in place (see buildForkDir)
			return err
		}
	}
	// The disk is linked when sealed (a Standby source's: the source's next
	// launch gives its VMM a private copy, the disk guard), else cloned.
	if _, err := m.shareFrom(dataSources{root}, "disk", g.Rootfs(), tmp.Rootfs(), true); err != nil {
		return err
	}
	meta, _ := json.MarshalIndent(map[string]any{"id": id, "source_dir": g.Dir, "created_at": time.Now().UTC()}, "", "  ")
	if err := atomicfile.WriteFile(tmp.Meta(), meta, sealMode); err != nil {
		return err
	}
	if err := atomicfile.SyncDir(tmp.Dir); err != nil {
		return err
	}
	return atomicfile.Rename(tmp.Dir, final.Dir)
}

func dirBytes(sd guestdir.SnapDir) int64 {
	var n int64
	for _, p := range []string{sd.Memory(), sd.MemoryZst(), sd.VMState()} {
		if st, err := os.Stat(p); err == nil {
			n += st.Size()
		}
	}
	return n
}

func snapshotAPI(s store.Snapshot) api.Snapshot {
	return api.Snapshot{
		ID: s.ID, Name: s.Name, SourceInstance: s.SourceInstance, CreatedAt: s.CreatedAt, SizeBytes: s.SizeBytes,
		Compression: s.Compression, State: s.State, SnapshotCacheKey: s.SnapshotCacheKey,
		MemoryMiB: s.MemoryMiB, Vcpus: s.Vcpus, Image: s.Image, HugePages: hugePagesAPI(s.HugePages),
	}
}

// ListSnapshots returns every snapshot in the store.
func (m *Manager) ListSnapshots(ctx context.Context) ([]api.Snapshot, error) {
	all, err := m.db.ListSnapshots(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.Snapshot, 0, len(all))
	for _, s := range all {
		if s.State == snapCreating {
			continue
		}
		out = append(out, snapshotAPI(s))
	}
	return out, nil
}

// GetSnapshot returns one snapshot.
func (m *Manager) GetSnapshot(ctx context.Context, ref string) (api.Snapshot, error) {
	s, err := m.resolveSnapshot(ctx, ref)
	if err != nil {
		return api.Snapshot{}, apiErr(err)
	}
	return snapshotAPI(s), nil
}

// DeleteSnapshot removes a snapshot. Forks already made are not affected:
// they hold their own link to the mem-file inode.
func (m *Manager) DeleteSnapshot(ctx context.Context, ref string) error {
	ctx = context.WithoutCancel(ctx)
	s, err := m.resolveSnapshotFor(ctx, ref, "delete")
	if err != nil {
		return apiErr(err)
	}
	m.cancelCompression(s.ID)
	// A concurrent delete may have won the lock first: exactly one succeeds.
	s, unlock, err := m.lockSnapshot(ctx, s.ID, true)
	if err != nil {
		return apiErr(err)
	}
	defer unlock()
	// A snapshot being created is not yet the store's to delete: its
	// create still builds its dir and then records it ready, and would
	// find its record gone (failing a snapshot that was made, and leaving
	// its renamed dir behind until the next start's sweep).
	if s.State == snapCreating && !m.deleteCreatingSnapshots {
		return fmt.Errorf("%w: snapshot %q is still being created; delete it once it is ready", api.ErrInvalidState, s.Name)
	}
	o, err := m.begin(ctx, "snapshot-delete", s.ID, opPayload{})
	if err != nil {
		return err
	}
	err = m.finishSnapshotDelete(ctx, s.ID)
	o.finish(ctx, err)
	return err
}

func (m *Manager) finishSnapshotDelete(ctx context.Context, id string) error {
	sd, err := m.layout.Snapshot(id)
	if err != nil {
		return err
	}
	trash, _ := m.layout.DeletingSnapshot(id)
	if err := atomicfile.Rename(sd.Dir, trash); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete snapshot %s: %w", id, err)
	}
	if err := m.db.DeleteSnapshot(ctx, id); err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	m.forgetSnapshot(id)
	if err := os.RemoveAll(trash); err != nil {
		m.log.Warn("delete snapshot: remove dir", "snapshot", id, "err", err)
	}
	m.kickPrefetchGC()
	m.log.Info("snapshot deleted", "snapshot", id)
	return nil
}
