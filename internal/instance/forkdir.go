package instance

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/forkd/forkd/internal/datadir"
	"github.com/forkd/forkd/internal/dirrecord"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/memfile"
	"github.com/forkd/forkd/internal/store"
)

// buildForkDir fills a fork's temp guest dir: the mem-file shared (hardlink:
// zero I/O, one inode and page cache for all siblings; clone only when
// linking fails; or per fork_strategy, see shareMemFile), the vmstate,
// kernel and disk linked too when sealed (a fork only reads them until it
// is launched; the disk guard gives its VMM a private disk then), cloned
// (reflink first) when a VMM may still write them. Nothing is fsynced: it returns the new inodes
// (clones, copies) for the caller to make durable with the dir, at once
// (syncForkTree). shared, when set, is called as soon as
// the mem-file is shared (or at once for a fork without memory), when the
// fork's fork_mode is known; the rest of the dir is built after it returns.
func (m *Manager) buildForkDir(tmp guestdir.Guest, made bool, f forkFiles, shared func(memfile.ShareResult)) (memfile.ShareResult, []string, error) {
	// The four source files are opened through one handle of the data dir.
	root, err := m.openDataRoot()
	if err != nil {
		return memfile.ShareResult{}, nil, err
	}
	defer root.Close()
	return m.buildForkDirFrom(dataSources{root}, tmp, made, f, shared)
}

// buildForkDirFrom is buildForkDir with the source files opened from srcs.
// made says tmp's empty tree exists already (a pooled one, forktrees.go).
func (m *Manager) buildForkDirFrom(srcs sources, tmp guestdir.Guest, made bool, f forkFiles, shared func(memfile.ShareResult)) (memfile.ShareResult, []string, error) {
	var res memfile.ShareResult
	var fresh []string // new inodes: their data must be fsynced
	if shared == nil {
		shared = func(memfile.ShareResult) {}
	}
	if !made {
		if err := makeForkTree(tmp, f.from != nil); err != nil {
			return res, nil, err
		}
	}
	if f.from != nil {
		var err error
		if res, err = m.shareMemFile(srcs, f.from.Memory(), tmp.Latest().Memory()); err != nil {
			return res, nil, err
		}
		if res.Mode != memfile.ModeHardlink {
			fresh = append(fresh, tmp.Latest().Memory())
		}
	}
	shared(res)
	// Every source is opened with no symlink below the data dir (a live
	// source's VMM owns its dir) and linked or cloned from that handle.
	if f.from != nil {
		// The vmstate is only ever read (a VMM loads it); its one writer,
		// a snapshot create, never rewrites an existing inode
		// (writeSnapshot's vmstate guard): link it like the mem-file, if
		// it is sealed (shareFrom; a live fork's fresh base is cloned).
		vres, err := m.shareFrom(srcs, "vmstate", f.from.VMState(), tmp.Latest().VMState(), false)
		if err != nil {
			return res, nil, err
		}
		if vres.Mode != memfile.ModeHardlink {
			fresh = append(fresh, tmp.Latest().VMState())
		}
	}
	if f.kernel != "" {
		// Nothing ever writes a kernel in place (VMMs open it read-only,
		// forkd writes new inodes; it is sealed as made), so a link shares
		// it safely: no copy of a user's kernel per fork where the
		// filesystem cannot reflink.
		kres, err := m.shareFrom(srcs, "kernel", f.kernel, tmp.Kernel(), false)
		if err != nil {
			return res, nil, err
		}
		if kres.Mode != memfile.ModeHardlink {
			fresh = append(fresh, tmp.Kernel())
		}
	}
	// A fork to Standby never writes its disk until a VMM runs it, and
	// every launch gives its VMM a private disk first (the disk guard,
	// unshareDisk): link a sealed disk like the mem-file (a source on
	// Standby, a store snapshot), so the fork makes no new data inode; clone
	// one a VMM may still write (a live fork's source, a Stopped one's).
	dres, err := m.shareFrom(srcs, "disk", f.rootfs, tmp.Rootfs(), false)
	if err != nil {
		return res, nil, err
	}
	if dres.Mode != memfile.ModeHardlink {
		fresh = append(fresh, tmp.Rootfs())
	}
	if os.Getenv(UnsafeSkipForkFileSyncEnv) == "1" {
		fresh = nil // the power-loss suite's twin only (crashhook.go)
	}
	return res, fresh, nil
}

// syncForkTree is a fork's durable point before its rename (whose fsync of
// the parent completes it): the new inodes, then every directory of the
// fork's tree, except on XFS (atomicfile.SyncTree: on btrfs one fsync of the
// top does not keep the links made below it; on XFS the rename's fsync
// carries the whole tree, so a fork that links every file fsyncs nothing
// before it).
func syncForkTree(dir string, fresh []string) error {
	twinTop, twinXFS := os.Getenv(UnsafeSyncForkTopDirOnlyEnv) == "1", os.Getenv(UnsafeSyncForkAsOnXFSEnv) == "1"
	if twinTop || twinXFS { // the power-loss suite's twins only (crashhook.go)
		for _, f := range fresh {
			if err := atomicfile.SyncFile(f); err != nil {
				return err
			}
		}
		if twinXFS {
			return nil
		}
		return atomicfile.SyncDir(dir)
	}
	return atomicfile.SyncTree(dir, fresh...)
}

// finishRecord fills in what a fork's record holds once its files exist:
// the inherited cache key and fork_mode, or, without memory, memory_check
// "unknown". Only the state is left to set.
func finishRecord(rec *store.Instance, res memfile.ShareResult, key string) {
	rec.SnapshotCacheKey, rec.ForkMode = key, string(res.Mode)
	if res.Mode == "" {
		rec.MemoryCheck = "unknown"
	}
}

// finishForkUnit is a fork's last commit: its record in its final state, its
// journal entry at committed and closed, in one unit, so the fork is kept
// whole or not at all.
func finishForkUnit(o *op, rec store.Instance) func(*store.Tx) error {
	return func(tx *store.Tx) error {
		if err := tx.UpdateInstance(rec); err != nil {
			return err
		}
		if err := tx.Step(o.id, "committed", nil); err != nil {
			return err
		}
		return tx.Finish(o.id, "done")
	}
}

// oneCommitForkUnit is the one commit of a fork whose directory carries
// its record (fork): its journal entry begun, committed and closed, and its
// finished record rec, in one unit. The name check is this insert, so a
// taken name writes nothing (the caller removes the renamed dir).
func oneCommitForkUnit(rec store.Instance) func(*store.Tx) error {
	return func(tx *store.Tx) error {
		id, err := tx.Begin("fork", rec.ID, opPayload{Source: rec.Source})
		if err != nil {
			return err
		}
		if err := tx.CreateInstance(rec); err != nil {
			return err
		}
		if err := tx.Step(id, "committed", nil); err != nil {
			return err
		}
		return tx.Finish(id, "done")
	}
}

// forkJournal is a fork's first commit (its journal entry and Forking
// record), made in the background while the fork's files are built.
type forkJournal struct {
	done chan struct{}
	o    *op            // set before done is closed
	rec  store.Instance // the record as committed (a networked one with its slot); read after done
	err  error          // set before done is closed
}

// wait returns the fork's journal entry once it is committed, or the error
// that kept it from being written (a taken name: nothing was written).
func (j *forkJournal) wait() (*op, error) {
	<-j.done
	return j.o, j.err
}

// beginFork starts the fork's first group commit: journal step begun and the
// record rec (a networked one takes its network slot and its publishes), in
// one unit, so a taken name leaves no journal entry behind. Unless synced,
// the commit does not wait for an fsync: the caller then gives the fork's
// directory its own record before its rename (fork).
func (m *Manager) beginFork(ctx context.Context, rec store.Instance, pubs []store.Publish, p opPayload, synced bool) *forkJournal {
	j := &forkJournal{done: make(chan struct{}), rec: rec}
	commit := m.db.GroupUnsynced
	if synced {
		commit = m.db.Group
	}
	go func() {
		defer close(j.done)
		var opID int64
		err := commit(ctx, "fork:beginning", func(tx *store.Tx) error {
			var err error
			if opID, err = tx.Begin("fork", j.rec.ID, p); err != nil {
				return err
			}
			if j.rec.Networked {
				return tx.CreateNetworkedInstance(&j.rec, m.net().Config().Slots(), pubs)
			}
			return tx.CreateInstance(j.rec)
		})
		if err != nil {
			j.err = networkRecordErr(m.net(), err)
			return
		}
		crashPoint("fork", "begun") // test hook (crashhook.go)
		j.o = &op{m: m, id: opID, kind: "fork", subject: j.rec.ID}
	}()
	return j
}

// rollForwardFork completes a fork whose last commit a power cut lost
// (fork, above): its journal entry says its record holds all but the final
// state, and its dir under its own name, which the fork only takes once the
// dir is complete and durable, says its files are there. It reports whether
// it completed the fork; if not, the caller rolls the fork back.
func (m *Manager) rollForwardFork(ctx context.Context, e store.Entry, p opPayload) (bool, error) {
	if !p.RollForward || os.Getenv(UnsafeNoForkRollForwardEnv) == "1" { // the env: a twin test only
		return false, nil
	}
	in, err := m.db.GetInstance(ctx, e.Subject)
	if err != nil || in.State != api.StateForking {
		return false, nil
	}
	g, err := m.guest(in.ID)
	if err != nil {
		return false, err
	}
	if st, err := os.Stat(g.Dir); err != nil || !st.IsDir() {
		return false, nil
	}
	return true, m.db.UpdateInstance(ctx, completed(in, memfile.ShareResult{Mode: memfile.Mode(in.ForkMode)}))
}

// forkRecordKind is the dirrecord kind of a fork's own record.
const forkRecordKind = "fork"

// forkDirRecord is what a fork's directory says about itself: its finished
// record (a networked one with its network slot), its publishes, and the
// identity of the mem-file and vmstate it was made with (filesIdentity; ""
// for a fork without memory), so a record that no longer describes its
// directory (the fork has since been restored and stood by, which writes
// new files) is never taken back.
type forkDirRecord struct {
	Instance  store.Instance  `json:"instance"`
	Publishes []store.Publish `json:"publishes,omitempty"`
	Files     string          `json:"files,omitempty"`
}

// writeForkRecord gives the fork's temp dir tmp its own record rec, with
// its publishes pubs.
func writeForkRecord(tmp guestdir.Guest, rec store.Instance, pubs []store.Publish) error {
	rec.NetWarm = false // how the slot was taken, not part of the record
	r := forkDirRecord{Instance: rec, Publishes: pubs}
	if rec.State == api.StateStandby {
		k, err := filesIdentity(tmp.Latest())
		if err != nil {
			return err
		}
		r.Files = k
	}
	return dirrecord.Write(tmp.Jail, forkRecordKind, r)
}

// filesIdentity names the mem-file and vmstate of d as files (filesStamp):
// not by their device, which btrfs numbers anew at each mount, as the
// record must still match after a power cut and a remount.
func filesIdentity(d guestdir.SnapDir) (string, error) { return filesStamp(d, false) }

// describes reports why the fork record r does not describe the guest dir
// g as it is now, or nil: a Standby fork's mem-file and vmstate must be the
// very files it was made with, and a fork without memory must still have
// none.
func (r forkDirRecord) describes(g guestdir.Guest) error {
	if r.Instance.State != api.StateStandby {
		if _, err := os.Lstat(g.Latest().Dir); err == nil {
			return fmt.Errorf("it has a snapshot, its record none")
		}
		return nil
	}
	k, err := filesIdentity(g.Latest())
	if err != nil {
		return err
	}
	if k != r.Files {
		return fmt.Errorf("its mem-file and vmstate are not the ones it was made with")
	}
	return nil
}

// restoreForkRecord gives back its record to a fork whose commits a power
// cut lost: dir, named id under the guests' dir, is complete and durable
// (it has its own name, which a fork takes only then) and carries the
// finished record (fork). It reports whether it restored the record; if
// not, the caller accounts for dir as it would without one.
func (m *Manager) restoreForkRecord(ctx context.Context, dir, id string) bool {
	if os.Getenv(UnsafeNoForkRollForwardEnv) == "1" || os.Getenv(UnsafeNoForkRecordRestoreEnv) == "1" { // twin tests only
		return false
	}
	var r forkDirRecord
	ok, err := dirrecord.Read(dir, forkRecordKind, &r)
	rec := r.Instance
	switch {
	case err != nil:
		m.log.Warn("reconcile: a dir's fork record cannot be read", "path", dir, "err", err)
		return false
	case !ok:
		return false
	case rec.ID != id || (rec.State != api.StateStandby && rec.State != api.StateStopped):
		m.log.Warn("reconcile: a dir's fork record is not its own", "path", dir, "record_id", rec.ID, "state", rec.State)
		return false
	}
	if err := datadir.Check(dir); err != nil {
		m.log.Warn("reconcile: a fork's dir is not safe to take back", "path", dir, "err", err)
		return false
	}
	// A record is taken back only while it describes the dir: after a
	// power cut it always does (whatever changed the fork since would have
	// made its commits durable), but a store restored from an older backup
	// can lack a fork that has run since.
	g, err := m.guest(id)
	if err == nil && os.Getenv(UnsafeStaleForkRecordEnv) != "1" { // the env: a twin test only
		err = r.describes(g)
	}
	if err != nil {
		m.log.Warn("reconcile: a fork's record no longer describes its dir", "path", dir, "instance", id, "err", err)
		return false
	}
	if err := m.recreateForkRecord(ctx, rec, r.Publishes); err != nil {
		// A name, slot or port taken since (which a synced commit would
		// have made durable with the fork's own) cannot be after a power
		// cut: keep the dir aside.
		m.log.Error("reconcile: restore a fork's record from its dir", "path", dir, "instance", id, "name", rec.Name, "err", err)
		return false
	}
	m.log.Warn("reconcile: a fork's record was lost with the power: restored from its dir", "instance", id, "name", rec.Name, "state", rec.State)
	return true
}

// recreateForkRecord inserts a fork's record restored from its directory: a
// networked one with the slot it held and its publishes, in one
// transaction (a warm slot it had taken is taken again; the network is made
// whole later, with every other, by reconcileNetwork).
func (m *Manager) recreateForkRecord(ctx context.Context, rec store.Instance, pubs []store.Publish) error {
	if !rec.Networked {
		return m.db.CreateInstance(ctx, rec)
	}
	if m.net() == nil {
		return fmt.Errorf("it is networked and networking is off on this daemon (%s)", m.cfg.NetworkOffReason)
	}
	return m.db.RestoreNetworkedInstance(ctx, rec, m.net().Config().Slots(), pubs)
}

// removePartial deletes whatever a failed or interrupted fork or create
// made: its temp dir, its dir and its record.
func (m *Manager) removePartial(ctx context.Context, id string) error {
	var errs []error
	if in, err := m.db.GetInstance(ctx, id); err == nil {
		if err := m.removeNetwork(in); err != nil {
			errs = append(errs, fmt.Errorf("remove its network: %w", err))
		}
	} else if !errors.Is(err, store.ErrNotFound) {
		errs = append(errs, err)
	}
	errs = append(errs, m.removePartialFiles(id))
	if err := m.db.DeleteInstance(ctx, id); err != nil && !errors.Is(err, store.ErrNotFound) {
		errs = append(errs, fmt.Errorf("delete its record: %w", err))
	}
	m.forget(id)
	return errors.Join(errs...)
}

// removePartialFiles deletes a partial fork's or create's temp dir (or
// pooled tree) and dir.
func (m *Manager) removePartialFiles(id string) error {
	var errs []error
	if tmp, err := m.layout.TempGuest(id); err == nil {
		if err := os.RemoveAll(tmp.Jail); err != nil {
			errs = append(errs, fmt.Errorf("remove its temp dir: %w", err))
		}
	}
	if tmp, err := m.layout.PooledGuest(id); err == nil { // a fork built in a pooled tree
		if err := os.RemoveAll(tmp.Jail); err != nil {
			errs = append(errs, fmt.Errorf("remove its pooled tree: %w", err))
		}
	}
	if g, err := m.layout.Guest(id); err == nil {
		// A fork of one commit renames its dir, which carries its record,
		// before that commit: were the removal cut short, the reconciler
		// would take back what is left (restoreForkRecord). The dir loses
		// its own name first, as a deleted instance's does (finishDelete).
		dir := g.Jail
		if trash, err := m.layout.DeletingGuest(id); err == nil && os.Getenv(UnsafeRemoveForkInPlaceEnv) != "1" { // the env: a twin test only
			if err := atomicfile.Rename(g.Jail, trash); err == nil {
				dir = trash
			}
		}
		m.fault("fork:removing") // a test's hook: what is left while it is removed
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, fmt.Errorf("remove its dir: %w", err))
		}
	}
	return errors.Join(errs...)
}
