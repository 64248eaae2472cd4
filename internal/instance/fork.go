package instance

import (
	"context"
	"fmt"
	"os"
	"runtime/trace"
	"sync"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/forkd/forkd/internal/capacity"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/hostpath"
	"github.com/forkd/forkd/internal/memfile"
	"github.com/forkd/forkd/internal/store"
)

// forkFiles is what a fork copies: the mem-file and vmstate pair (from a
// Standby instance's snapshot-latest, a running instance's fresh base or a
// store snapshot), the kernel if it lives in the source dir, and the disk.
type forkFiles struct {
	from   *guestdir.SnapDir // nil: no memory (fork of a Stopped source)
	kernel string            // "" or a file to clone
	rootfs string
}

// ForkInstance forks an instance (docs/architecture.md §5): from Standby under the
// source's read lock (forks of one source run in parallel); from Running or
// Paused only with from_running, as a live fork (pause, update the base in
// place, fork from it, resume; the source VMM never restarts); from Stopped
// or Created, disk only.
func (m *Manager) ForkInstance(ctx context.Context, ref string, req api.ForkRequest) (api.Instance, error) {
	start := time.Now()
	defer m.observe("fork", start)
	defer m.netOpStart()()
	ctx = context.WithoutCancel(ctx)
	// Trace regions (forkd serve --profile) name where a fork's time goes.
	admitted := sync.OnceFunc(trace.StartRegion(ctx, "fork: admit").End)
	defer admitted()
	probe, err := m.resolveInstance(ctx, ref)
	if err != nil {
		return api.Instance{}, apiErr(err)
	}
	live := oneOf(probe.State, api.StateRunning, api.StatePaused)
	if live && !req.FromRunning {
		return api.Instance{}, fmt.Errorf("%w: instance %q is %s; stand it by first or pass from_running", api.ErrInvalidState, probe.Name, probe.State)
	}
	src, unlockSrc, err := m.lockResolved(ctx, probe, live)
	if err != nil {
		return api.Instance{}, err
	}
	var once sync.Once
	release := func() { once.Do(unlockSrc) }
	defer release()
	var target string
	switch {
	case live && oneOf(src.State, api.StateRunning, api.StatePaused):
		target = api.StateRunning
		if src.State == api.StatePaused {
			target = api.StateStandby
		}
	case !live && src.State == api.StateStandby:
		target = api.StateStandby
	case !live && oneOf(src.State, api.StateStopped, api.StateCreated):
		target = api.StateStopped
	default:
		return api.Instance{}, invalidState(src, "fork", api.StateStandby, api.StateRunning+" (from_running)", api.StateStopped)
	}
	if req.TargetState != "" {
		target = req.TargetState
	}
	hasMemory := src.State != api.StateStopped && src.State != api.StateCreated
	if err := checkTarget(target, hasMemory); err != nil {
		return api.Instance{}, err
	}
	if err := m.checkForkBackend(target, hasMemory, src, req.RestoreBackend); err != nil {
		return api.Instance{}, err
	}
	g, err := m.guest(src.ID)
	if err != nil {
		return api.Instance{}, err
	}
	if hasMemory && !live {
		// Never hand a damaged mem-file on to a fork.
		if err := memFileFits(fmt.Sprintf("the snapshot of instance %q", src.Name), g.Latest(), src.MemoryMiB); err != nil {
			return api.Instance{}, fmt.Errorf("fork of %q: %w", src.Name, err)
		}
	}
	id := newID()
	cost := m.forkCost(g.Rootfs(), src.MemoryMiB, hasMemory)
	if live {
		cost += m.snapshotCost(g.Base(), src.MemoryMiB)
	}
	releaseCap, err := m.reserveCapacity(ctx, "fork", capacity.Request{ID: id, MemoryMiB: src.MemoryMiB, Vcpus: src.Vcpus,
		Runs: target == api.StateRunning, DiskBytes: cost, HugePages: src.HugePages != ""})
	if err != nil {
		return api.Instance{}, err
	}
	defer releaseCap()
	files := forkFiles{rootfs: g.Rootfs()}
	if _, err := os.Stat(g.Kernel()); err == nil {
		files.kernel = g.Kernel()
	}
	tmpl := src
	tmpl.Source = "instance:" + src.ID
	spec := forkSpec{files: files}
	switch {
	case live:
		base := g.Base()
		spec.files.from = &base
		spec.live = func(ctx context.Context, o *op, build func() error) (string, error) {
			return m.updateBaseLive(ctx, o, &src, build)
		}
	case hasMemory:
		latest := g.Latest()
		spec.files.from, spec.key = &latest, src.SnapshotCacheKey
	}
	admitted()
	fork, err := m.fork(ctx, id, req, tmpl, spec)
	release()
	if err != nil {
		return api.Instance{}, err
	}
	return m.applyTarget(ctx, fork, target, req.RestoreBackend)
}

// ForkSnapshot forks a store snapshot, under the snapshot's read lock (so
// it is not deleted mid-fork; it may be deleted the moment this returns).
func (m *Manager) ForkSnapshot(ctx context.Context, ref string, req api.ForkRequest) (api.Instance, error) {
	start := time.Now()
	defer m.observe("fork", start)
	defer m.netOpStart()()
	ctx = context.WithoutCancel(ctx)
	// Trace regions (forkd serve --profile) name where a fork's time goes.
	admitted := sync.OnceFunc(trace.StartRegion(ctx, "fork: admit").End)
	defer admitted()
	sn, err := m.resolveSnapshot(ctx, ref)
	if err != nil {
		return api.Instance{}, apiErr(err)
	}
	sn, unlockSnap, err := m.lockSnapshot(ctx, sn.ID, false)
	if err != nil {
		return api.Instance{}, apiErr(err)
	}
	var once sync.Once
	release := func() { once.Do(unlockSnap) }
	defer release()
	if sn.State == snapCreating {
		return api.Instance{}, fmt.Errorf("%w: snapshot %q is still being created", api.ErrInvalidState, sn.Name)
	}
	target := req.TargetState
	if target == "" {
		target = api.StateStandby
	}
	if err := checkTarget(target, true); err != nil {
		return api.Instance{}, err
	}
	if err := m.checkForkBackend(target, true, store.Instance{Name: sn.Name, HugePages: sn.HugePages}, req.RestoreBackend); err != nil {
		return api.Instance{}, err
	}
	sd, err := m.layout.Snapshot(sn.ID)
	if err != nil {
		return api.Instance{}, err
	}
	broken, raw := sn.State == snapBroken, false
	if !broken {
		broken, raw = m.markIfBroken(ctx, &sn)
	}
	if broken {
		return api.Instance{}, brokenError(sn, sd)
	}
	id := newID()
	cost := m.forkCost(sd.Rootfs(), sn.MemoryMiB, true)
	if !raw {
		cost += int64(sn.MemoryMiB) << 20 // materialised once, for this and later forks
	}
	releaseCap, err := m.reserveCapacity(ctx, "fork", capacity.Request{ID: id, MemoryMiB: sn.MemoryMiB, Vcpus: sn.Vcpus,
		Runs: target == api.StateRunning, DiskBytes: cost, HugePages: sn.HugePages != ""})
	if err != nil {
		return api.Instance{}, err
	}
	defer releaseCap()
	// A raw mem-file markIfBroken found whole stays so under the
	// snapshot's read lock (compression drops it only under the write
	// lock): only a compressed one is materialised, and checked after.
	if !raw {
		if err := m.materialise(ctx, sn.ID, sd); err != nil {
			return api.Instance{}, err
		}
		if err := memFileFits(fmt.Sprintf("snapshot %q", sn.Name), sd, sn.MemoryMiB); err != nil {
			return api.Instance{}, fmt.Errorf("fork of snapshot %q: %w", sn.Name, err)
		}
	}
	files := forkFiles{from: &sd, rootfs: sd.Rootfs()}
	if _, err := os.Stat(sd.Kernel()); err == nil {
		files.kernel = sd.Kernel()
	}
	tmpl := store.Instance{
		Vcpus: sn.Vcpus, MemoryMiB: sn.MemoryMiB, Kernel: sn.Kernel, BootArgs: sn.BootArgs,
		Source: "snapshot:" + sn.ID, Networked: sn.NetGuest != "", NetGuest: sn.NetGuest, NetMAC: sn.NetMAC,
		Image:     sn.Image,
		VsockCID:  sn.VsockCID,
		HugePages: sn.HugePages,
	}
	admitted()
	fork, err := m.fork(ctx, id, req, tmpl, forkSpec{files: files, key: sn.SnapshotCacheKey})
	release()
	if err != nil {
		return api.Instance{}, err
	}
	return m.applyTarget(ctx, fork, target, req.RestoreBackend)
}

// checkForkBackend refuses, before anything is made, a fork to Running
// that would restore src's memory with a backend it cannot have
// (restoreBackend).
func (m *Manager) checkForkBackend(target string, hasMemory bool, src store.Instance, backend string) error {
	if target != api.StateRunning || !hasMemory {
		return nil
	}
	_, err := restoreBackend(src, backend, m.cfg.ForkRestoreBackend)
	return err
}

func checkTarget(target string, hasMemory bool) error {
	switch target {
	case api.StateStandby:
		if !hasMemory {
			return fmt.Errorf("%w: target_state Standby needs a source with memory (Standby, Running or a snapshot)", api.ErrInvalid)
		}
	case api.StateRunning, api.StateStopped:
	default:
		return fmt.Errorf("%w: target_state %q: want Standby, Running or Stopped", api.ErrInvalid, target)
	}
	return nil
}

// forkSpec is what fork makes a fork from.
type forkSpec struct {
	files forkFiles
	key   string // the snapshot cache key the fork inherits ("" without memory)
	// live, for a fork of a running VM, brings the source's base up to date
	// (pausing it, journalled through o), runs build while the source is
	// still paused, and returns the base's new cache key.
	live func(ctx context.Context, o *op, build func() error) (string, error)
}

// fork admits the fork's name, journals it, builds its directory (under a
// temp name, renamed into place once complete and durable) and records it:
// Standby with the inherited cache key, or Stopped without memory. Any
// failure removes the partial fork.
//
// A fork of a Standby instance or a snapshot has one durable point: the
// rename of its directory into place. Its first commit
// (the journal entry naming the fork, with its Forking record, which
// already holds everything the finished record holds but its state) is
// made once the mem-file is shared (its fork_mode known), while the rest of
// the directory is built, and the directory takes the fork's own name only
// once that commit is made. Where the data dir keeps directory records
// (fsAdvice.records), the directory carries the finished record itself
// (dirrecord, written before the rename and made durable by it), so neither
// commit waits for an fsync (store.GroupUnsynced): a power cut that loses
// them leaves the directory under its own name, which only a complete,
// durable fork has, and the reconciler restores the record from it
// (restoreForkRecord) or, when the first commit survived, completes it
// (rollForwardFork). Where it keeps none, the first commit is synced, and
// only the last is not. A networked fork's first commit also takes its
// network slot (a warm one when the pool has one) and its publishes; its
// network is made once that commit is made, and its directory's record,
// which holds the slot and the publishes too, is written after it, before
// the rename. Both commits are shared with whatever other forks commit at
// the same moment (store.Group).
//
// A live fork journals and records itself first, and makes its network,
// before it pauses its source; its last commit is synced.
func (m *Manager) fork(ctx context.Context, id string, req api.ForkRequest, tmpl store.Instance, spec forkSpec) (store.Instance, error) {
	if req.Name == "" {
		req.Name = id // an unnamed instance is named by its own id
	} else if err := validName("instance", req.Name); err != nil {
		return store.Instance{}, err
	}
	final, err := m.guest(id)
	if err != nil {
		return store.Instance{}, err
	}
	tmp, err := m.layout.TempGuest(id)
	if err != nil {
		return store.Instance{}, err
	}
	// A fork of a networked source is networked with the source's guest
	// identity (the guest keeps it in memory); it never inherits
	// publishes, and gets its own only if asked.
	var pubs []store.Publish
	if len(req.Publish) > 0 {
		if !tmpl.Networked {
			return store.Instance{}, fmt.Errorf("%w: publish needs a network, and %s has none", api.ErrInvalid, tmpl.Source)
		}
	}
	if tmpl.Networked {
		if m.net() == nil {
			return store.Instance{}, fmt.Errorf("%w: %s is networked but networking is off on this daemon (%s)", api.ErrInvalid, tmpl.Source, m.cfg.NetworkOffReason)
		}
		if pubs, err = m.checkPublishes(req.Publish); err != nil {
			return store.Instance{}, err
		}
	}
	rec := store.Instance{
		ID: id, Name: req.Name, State: api.StateForking, Vcpus: tmpl.Vcpus, MemoryMiB: tmpl.MemoryMiB,
		Kernel: tmpl.Kernel, Rootfs: tmpl.Rootfs, BootArgs: tmpl.BootArgs, CreatedAt: time.Now().UTC(),
		Source: tmpl.Source, MemoryCheck: tmpl.MemoryCheck,
		Networked: tmpl.Networked, NetGuest: tmpl.NetGuest, NetMAC: tmpl.NetMAC,
		Image:     tmpl.Image,
		VsockCID:  tmpl.VsockCID,  // its vmstate has the source's vsock device
		HugePages: tmpl.HugePages, // and its memory's pages
	}
	rec.RestoreBackend, _ = restoreBackend(rec, "", m.cfg.ForkRestoreBackend)
	fail := func(o *op, err error) (store.Instance, error) {
		err = fmt.Errorf("fork %q from %s: %w", req.Name, tmpl.Source, err)
		u := m.undo("fork", id)
		if o == nil { // nothing journalled: only the temp dir may exist
			u.do("remove the partial fork's files", m.removePartialFiles(id))
			return store.Instance{}, u.join(apiErr(err))
		}
		u.do("remove the partial fork", m.removePartial(ctx, id))
		err = u.join(err)
		o.finish(ctx, err)
		return store.Instance{}, err
	}
	var res memfile.ShareResult
	var o *op
	unsynced := false
	if spec.live != nil {
		if o, err = m.begin(ctx, "fork", id, opPayload{Source: tmpl.Source, Live: true}); err != nil {
			return store.Instance{}, err
		}
		if err := m.createRecord(ctx, &rec, pubs); err != nil {
			o.finish(ctx, err)
			return store.Instance{}, err
		}
		// The network before the files: a live source is paused only while
		// its memory is copied, never while a namespace is made.
		if err := m.setupNetwork(ctx, o, rec, pubs); err != nil {
			return fail(o, err)
		}
		build := func() error {
			var fresh []string
			if res, fresh, err = m.buildForkDir(tmp, spec.files, nil); err != nil {
				return err
			}
			if err := syncForkTree(tmp.Jail, fresh); err != nil {
				return err
			}
			return atomicfile.Rename(tmp.Jail, final.Jail)
		}
		if spec.key, err = spec.live(ctx, o, build); err != nil {
			return fail(o, err)
		}
		finishRecord(&rec, res, spec.key)
	} else {
		var j *forkJournal
		var fresh []string
		records := m.fs.records
		r := trace.StartRegion(ctx, "fork: build")
		res, fresh, err = m.buildForkDir(tmp, spec.files, func(res memfile.ShareResult) {
			finishRecord(&rec, res, spec.key)
			synced := !records && os.Getenv(UnsafeUnsyncedForkBeginEnv) != "1" // the env: a twin test only
			j = m.beginFork(ctx, rec, pubs, opPayload{Source: tmpl.Source, RollForward: true}, synced)
		})
		r.End()
		if j == nil {
			return fail(nil, err)
		}
		if err == nil && records && !rec.Networked {
			// The fork's finished record, in its own directory: made durable
			// by the rename's fsync, it is what the reconciler restores the
			// fork from if a power cut loses the unsynced commits.
			err = writeForkRecord(tmp, completed(rec, res), nil)
		}
		if err == nil && !rec.Networked { // fsync the new inodes and the dir while the journal commits
			trace.WithRegion(ctx, "fork: sync tree", func() { err = syncForkTree(tmp.Jail, fresh) })
		}
		var jerr error
		trace.WithRegion(ctx, "fork: wait for the journal", func() { o, jerr = j.wait() })
		if jerr != nil {
			return fail(nil, jerr)
		}
		rec = j.rec // a networked fork's slot, taken in the commit
		if err == nil && rec.Networked {
			// A networked fork's record names the slot its commit took, so
			// it is written after that commit, and the tree is made durable
			// after the record (btrfs makes a directory's attributes
			// durable with that directory's own fsync).
			if err = m.setupNetwork(ctx, o, rec, pubs); err == nil && records {
				err = writeForkRecord(tmp, completed(rec, res), pubs)
			}
			if err == nil {
				trace.WithRegion(ctx, "fork: sync tree", func() { err = syncForkTree(tmp.Jail, fresh) })
			}
		}
		if err == nil { // the fork's own name only once the journal names it
			trace.WithRegion(ctx, "fork: rename", func() { err = atomicfile.Rename(tmp.Jail, final.Jail) })
		}
		if err != nil {
			return fail(o, err)
		}
		unsynced = true
	}
	crashPoint("fork", "files") // test hook: the fork's dir is durable, its record still Forking
	rec = completed(rec, res)
	commit := m.db.Group
	if unsynced {
		commit = m.db.GroupUnsynced
	}
	r := trace.StartRegion(ctx, "fork: last commit")
	err = commit(ctx, "fork:committing", finishForkUnit(o, rec))
	r.End()
	if err != nil {
		return fail(o, err)
	}
	crashPoint("fork", "committed") // test hook (crashhook.go)
	m.countFallback(res, "fork", id)
	m.log.Info("forked", "instance", id, "name", req.Name, "source", tmpl.Source, "mode", res.Mode, "live", spec.live != nil)
	return rec, nil
}

// completed is a fork's record once its files are in place: Standby, or
// Stopped when it has no memory (no vmstate: its start makes its vsock
// device).
func completed(rec store.Instance, res memfile.ShareResult) store.Instance {
	rec.State = api.StateStandby
	if res.Mode == "" {
		rec.State, rec.VsockCID = api.StateStopped, 0
	}
	return rec
}

// Fork strategies (Config.ForkStrategy): how a fork gets its mem-file.
const (
	// ForkStrategyHardlink: memfile.ShareForFork, a hardlink to the source's
	// inode (a clone only where linking fails). forkd's behaviour and the
	// only zero-I/O fanout (invariant 1 of docs/architecture.md §3).
	ForkStrategyHardlink = "hardlink"
	// ForkStrategyReflink: a FICLONE reflink per fork; a fork on a filesystem
	// that cannot reflink fails rather than silently copying.
	ForkStrategyReflink = "reflink"
	// ForkStrategyCopy: a full physical copy per fork (memfile.Copy).
	ForkStrategyCopy = "copy"
)

// ValidForkStrategy returns an error unless s is one of the ForkStrategy*
// names.
func ValidForkStrategy(s string) error {
	switch s {
	case ForkStrategyHardlink, ForkStrategyReflink, ForkStrategyCopy:
		return nil
	}
	return fmt.Errorf("fork strategy %q: want hardlink, reflink or copy", s)
}

// shareMemFile gives a fork (dst, in a dir being built) the source's
// mem-file (src, opened through root) the way Config.ForkStrategy says; the result's Mode is the
// fork's fork_mode. Nothing is fsynced: a result other than a hardlink is a
// new inode for buildForkDir's caller to fsync.
//
// The default shares the inode when it is sealed and clones it (sealing the
// clone) when a VMM may still write it (a live fork's fresh base): see
// inodes.go. Every fork's mem-file is sealed.
func (m *Manager) shareMemFile(root *hostpath.Root, src, dst string) (memfile.ShareResult, error) {
	if m.cfg.ForkStrategy == ForkStrategyHardlink {
		return m.shareFrom(root, "mem-file", src, dst, false)
	}
	f, err := root.Open("mem-file", src)
	if err != nil {
		return memfile.ShareResult{}, err
	}
	defer f.Close()
	res := memfile.ShareResult{Mode: memfile.ModeCopy}
	if m.cfg.ForkStrategy == ForkStrategyReflink {
		mode, err := m.files.CloneFileInto(f, dst)
		if err != nil {
			return memfile.ShareResult{}, err
		}
		if mode != memfile.ModeReflink {
			// Clone copied: the filesystem has no FICLONE. The caller removes
			// the fork's partial dir, copy included.
			return memfile.ShareResult{}, fmt.Errorf("fork_strategy reflink: the filesystem holding %s cannot reflink (FICLONE refused; Clone fell back to a %s); use fork_strategy hardlink or copy, or a reflink filesystem (XFS, btrfs)", src, mode)
		}
		res.Mode = memfile.ModeReflink
	} else if err := m.files.CopyFileInto(f, dst); err != nil {
		return memfile.ShareResult{}, err
	}
	return res, sealPath(dst)
}

// applyTarget brings a new fork to its target state: Standby as made,
// Running by restoring it (backend: the request's, else fork_restore_backend)
// or booting it (disk-only forks), Stopped by dropping its memory. A failure
// deletes the fork.
func (m *Manager) applyTarget(ctx context.Context, rec store.Instance, target, backend string) (api.Instance, error) {
	if target == rec.State {
		return m.toAPI(ctx, rec), nil
	}
	l := m.instanceLock(rec.ID)
	l.Lock()
	defer l.Unlock()
	// The fork is visible (Standby/Stopped) from its commit until this lock:
	// another client may have restored, stopped or deleted it meanwhile.
	// Act only on the state it was made in, and never remove a fork someone
	// else is already using.
	cur, err := m.db.GetInstance(ctx, rec.ID)
	if err != nil {
		return api.Instance{}, fmt.Errorf("fork %q: target state %s: %w", rec.Name, target, apiErr(err))
	}
	if cur.State != rec.State {
		return m.toAPI(ctx, cur), nil
	}
	rec = cur
	switch {
	case target == api.StateRunning && rec.State == api.StateStandby:
		err = m.restore(ctx, &rec, backend, m.cfg.ForkRestoreBackend)
	case target == api.StateRunning && rec.State == api.StateStopped:
		err = m.start(ctx, &rec, api.ActionRequest{})
	case target == api.StateStopped:
		err = m.stop(ctx, &rec, api.ActionRequest{})
	default:
		err = fmt.Errorf("%w: cannot bring a %s fork to %s", api.ErrInvalid, rec.State, target)
	}
	if err != nil {
		if derr := m.finishDelete(ctx, rec); derr != nil {
			m.log.Error("fork: remove after failed target state", "instance", rec.ID, "err", derr)
		}
		return api.Instance{}, fmt.Errorf("fork %q: target state %s: %w (fork removed)", rec.Name, target, err)
	}
	return m.toAPI(ctx, rec), nil
}
