package instance

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/datadir"
	"github.com/forkd/forkd/internal/dirrecord"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/memfile"
	"github.com/forkd/forkd/internal/store"
	"github.com/forkd/forkd/internal/version"
)

// Reconcile brings the store, the data dir and the running VMMs back into
// agreement after a crash or restart. It runs once, from New, before the
// manager serves anything:
//  1. every journal entry left open is finished or rolled back, by kind and
//     last step (see reconcileEntry); first, a fork batch whose every fork
//     is whole on disk is completed (rollForwardBatches), and the forks of
//     any other interrupted batch are removed;
//  2. temp files (*.tmp, *.unshare.tmp) and half-made or half-deleted
//     directories are removed; what no record or journal entry accounts for
//     is moved to lost+found, never deleted (sweepDataDirs);
//  3. each instance that should have a VMM is re-adopted by pid + socket (VMMs
//     run in their own session and outlive the daemon); one whose VMM died
//     becomes Standby if it has a complete snapshot-latest, else Stopped;
//     every other VMM started for an instance is killed, and has exited
//     before the instance's dir and jail are touched;
//  4. networks: every namespace and host link of this data dir's tag that
//     no record holds is removed, every one a record holds is made whole
//     (also after a host reboot), and the host table is rebuilt from the
//     records (reconcileNetwork);
//  5. interrupted compressions restart.
//
// Everything it changes is logged.
func (m *Manager) Reconcile(ctx context.Context) error {
	entries, err := m.db.OpenEntries(ctx)
	if err != nil {
		return err
	}
	// A fork batch whose last commit was lost is completed whole first
	// (forkbatch.go); its entries are finished then, so they are read again.
	if n, err := m.rollForwardBatches(ctx, entries); err != nil {
		return err
	} else if n > 0 {
		if entries, err = m.db.OpenEntries(ctx); err != nil {
			return err
		}
	}
	for _, e := range entries {
		what, handled, err := m.images.ReconcileEntry(ctx, e)
		if !handled {
			what, err = m.reconcileEntry(ctx, e)
		}
		outcome := "reconciled: " + what
		if err != nil {
			outcome = "reconcile failed: " + err.Error()
			m.log.Error("reconcile: journal entry", "op", e.Kind, "subject", e.Subject, "step", e.Step, "err", err)
		} else {
			m.log.Info("reconcile: journal entry", "op", e.Kind, "subject", e.Subject, "step", e.Step, "action", what)
		}
		if err := m.db.Finish(ctx, e.ID, outcome); err != nil {
			return err
		}
	}
	if err := m.sweepDataDirs(ctx); err != nil {
		return err
	}
	if err := m.images.Sweep(ctx, m.moveToLostFound); err != nil {
		return fmt.Errorf("reconcile images: %w", err)
	}
	all, err := m.db.ListInstances(ctx)
	if err != nil {
		return err
	}
	vmms := vmmsByID(scanVMMs()) // one /proc scan for every instance (orphans.go)
	for _, in := range all {
		m.reconcileInstance(ctx, in, vmms)
	}
	m.removeOrphanCgroups() // jail.go: the VMMs that run are known now
	// Networks last, once every record is settled (network.go). A host
	// that cannot network fails only its networked VMs, not the start.
	if err := m.reconcileNetwork(ctx); err != nil {
		m.log.Error("reconcile: network", "err", err)
	}
	snaps, err := m.db.ListSnapshots(ctx)
	if err != nil {
		return err
	}
	for _, s := range snaps {
		if s.State == snapCreating {
			m.log.Info("reconcile: removing half-made snapshot", "snapshot", s.ID)
			m.finishSnapshotDelete(ctx, s.ID)
			continue
		}
		if s.State != snapBroken {
			if broken, _ := m.markIfBroken(ctx, &s); broken {
				continue
			}
		}
		m.sealStoreDir(s.ID)
		if s.State == snapCompressing {
			m.log.Info("reconcile: restarting compression", "snapshot", s.ID)
			m.startCompression(s)
		}
	}
	if n, err := m.db.PruneJournal(ctx, journalKeep); err == nil && n > 0 {
		m.log.Info("reconcile: pruned finished journal entries", "count", n)
	}
	return nil
}

// journalKeep is how many finished journal entries survive a restart (for
// post-mortems); open ones are always kept until reconciled.
const journalKeep = 10000

// reconcileEntry finishes or rolls back one interrupted operation and says
// what it did.
func (m *Manager) reconcileEntry(ctx context.Context, e store.Entry) (string, error) {
	var p opPayload
	if err := json.Unmarshal(e.Payload, &p); err != nil {
		return "", fmt.Errorf("journal payload %s: %w", e.Payload, err)
	}
	// o lets finish* helpers close the entry; Reconcile closes it again
	// with the reconcile outcome.
	o := &op{m: m, id: e.ID, kind: e.Kind, subject: e.Subject}
	switch e.Kind {
	case "delete":
		in, err := m.db.GetInstance(ctx, e.Subject)
		if errors.Is(err, store.ErrNotFound) {
			return "already deleted", nil
		}
		if err != nil {
			return "", err
		}
		return "finished the delete", m.finishDelete(ctx, in)
	case "snapshot-delete":
		return "finished the snapshot delete", m.finishSnapshotDelete(ctx, e.Subject)
	case "create":
		if e.Step == "files" {
			return "kept (files complete)", nil
		}
		return "rolled back the create", m.removePartial(ctx, e.Subject)
	case "fork":
		m.liveSourceAfterCrash(ctx, p, e.Step)
		if e.Step == "committed" {
			return "kept (fork complete)", nil
		}
		if done, err := m.rollForwardFork(ctx, e, p); err != nil || done {
			return "completed the fork (its dir was in place; its last commit was lost)", err
		}
		return "removed the partial fork", m.removePartial(ctx, e.Subject)
	case "snapshot":
		m.liveSourceAfterCrash(ctx, p, e.Step)
		sd, err := m.layout.Snapshot(e.Subject)
		if err != nil {
			return "", err
		}
		if e.Step == "stored" {
			sn, err := m.db.GetSnapshot(ctx, e.Subject)
			if err == nil && sn.State == snapCreating {
				sn.State, sn.SizeBytes = snapReady, dirBytes(sd)
				return "completed the snapshot record", m.db.UpdateSnapshot(ctx, sn)
			}
			return "kept (snapshot complete)", nil
		}
		if tmp, err := m.layout.TempSnapshot(e.Subject); err == nil {
			os.RemoveAll(tmp.Dir)
		}
		return "removed the partial snapshot", m.finishSnapshotDelete(ctx, e.Subject)
	}
	in, err := m.db.GetInstance(ctx, e.Subject)
	if errors.Is(err, store.ErrNotFound) {
		return "instance gone", nil
	}
	if err != nil {
		return "", err
	}
	g, err := m.guest(in.ID)
	if err != nil {
		return "", err
	}
	switch e.Kind {
	case "stop":
		return "finished the stop", m.finishStop(ctx, &in)
	case "start":
		if in.State == api.StateRunning {
			return "kept (started)", nil
		}
		return "rolled back the start (VMM killed)", m.killVMM(ctx, in.ID, p.Pid, g)
	case "standby":
		proc, alive := m.adopt(in, g)
		switch {
		case e.Step == "created":
			in.Pid = 0
			if proc != nil {
				in.Pid = proc.Pid
			}
			return "finished the standby", m.finishStandby(ctx, o, &in, g)
		case alive:
			// The snapshot did not complete: drop what it may have half
			// written, then give the VM back its state. A base promoted but
			// not yet written to is still intact: demote it again.
			// The VMM lives and owns its dir: by name only (os.Root).
			if e.Step == "creating" {
				if err := m.removeInGuest(g, g.Latest().Dir); err != nil {
					return "", err
				}
			} else if _, err := os.Lstat(g.Latest().Dir); err == nil {
				if err := m.removeInGuest(g, g.Base().Dir); err != nil {
					return "", err
				}
				if err := m.renameInGuest(g, g.Latest().Dir, g.Base().Dir); err != nil {
					return "", err
				}
			}
			in.State, in.Pid = p.Prev, proc.Pid
			if in.State == api.StateRunning {
				c := m.client(g)
				c.Resume(ctx)
				c.Close()
			}
			return "rolled back the standby (VMM adopted, " + in.State + ")", m.db.UpdateInstance(ctx, in)
		default:
			return "VMM died mid-standby: stopped", m.markStopped(ctx, &in, g)
		}
	case "restore":
		in.Pid = p.Pid // the VMM launched for the restore (recorded at "launched")
		proc, alive := m.adopt(in, g)
		if e.Step == "resumed" && alive {
			in.Pid, in.PagerSession = proc.Pid, p.Session
			if p.Session != "" {
				in.PagerVersion = version.Version // the restore's session is this version's pager's
			}
			return "finished the restore (VMM adopted)", m.finishRestore(ctx, o, &in)
		}
		kerr := m.killVMM(ctx, in.ID, p.Pid, g)
		if p.Session != "" {
			// A restore opens its session with this version's pager.
			in.PagerSession, in.PagerVersion = p.Session, version.Version
			m.closeSession(ctx, &in)
		}
		// A Standby record holds no error: what happened is this entry's
		// outcome and the reconciler's log line.
		in.State, in.Pid, in.Error = api.StateStandby, 0, ""
		return "rolled back the restore interrupted by a daemon restart (Standby)", errors.Join(kerr, m.db.UpdateInstance(ctx, in))
	}
	return "unknown kind: left as is", nil
}

// liveSourceAfterCrash repairs the source of an interrupted live snapshot
// or live fork: a diff into its base that may not have completed leaves the
// base unusable (dropped: the next snapshot is Full). Resuming the paused
// source happens in reconcileInstance.
func (m *Manager) liveSourceAfterCrash(ctx context.Context, p opPayload, step string) {
	if step != "creating" {
		return
	}
	id := strings.TrimPrefix(p.Source, "instance:")
	g, err := m.layout.Guest(id)
	if err != nil {
		return
	}
	if err := m.removeInGuest(g, g.Base().Dir); err == nil {
		m.log.Info("reconcile: dropped a base whose diff may be partial", "instance", id)
	}
}

// adopt re-attaches to an instance's VMM if it still runs.
func (m *Manager) adopt(in store.Instance, g guestdir.Guest) (*firecracker.Process, bool) {
	if p := m.proc(in.ID); p != nil && p.Alive() {
		return p, true
	}
	if in.Pid <= 0 {
		return nil, false
	}
	p, err := firecracker.Adopt(in.Pid, g.VMMSock())
	if err != nil {
		return nil, false
	}
	m.setProc(in.ID, p)
	m.claimJail(in.ID, p.Pid)
	return p, true
}

// reconcileInstance re-adopts an instance's VMM or, if it died, settles the
// instance on Standby (complete snapshot-latest) or Stopped.
func (m *Manager) reconcileInstance(ctx context.Context, in store.Instance, vmms map[string][]int) {
	g, err := m.guest(in.ID)
	if err != nil {
		m.log.Error("reconcile: bad instance id", "instance", in.ID, "err", err)
		return
	}
	if !oneOf(in.State, api.StateRunning, api.StatePaused, api.StateStandingby, api.StateRestoring) {
		// No VMM runs for it: end any a crash left (orphans.go), clear
		// what the last one could have left, and seal a snapshot no VMM
		// can write any more (a data dir from before jails has them
		// unsealed; forks link only sealed inodes).
		m.killUnrecordedVMMs(ctx, in.ID, vmms)
		if err := sanitizeGuest(g); err != nil {
			m.log.Error("reconcile: clear a guest dir", "instance", in.ID, "err", err)
		}
		if in.State == api.StateStandby {
			if err := sealSnapDir(g, g.Latest()); err != nil {
				m.log.Error("reconcile: seal a Standby snapshot", "instance", in.ID, "err", err)
			}
			if err := sealDisk(g); err != nil {
				m.log.Error("reconcile: seal a Standby disk", "instance", in.ID, "err", err)
			}
		}
	}
	switch in.State {
	case api.StateForking, stateCreating:
		m.log.Info("reconcile: removing a fork or create with no journal entry", "instance", in.ID, "state", in.State)
		if err := m.removePartial(ctx, in.ID); err != nil {
			m.log.Error("reconcile: remove a partial instance", "instance", in.ID, "err", err)
		}
	case api.StateRunning, api.StatePaused, api.StateStandingby, api.StateRestoring:
		p, ok := m.adopt(in, g)
		// Any other VMM of this id is a crash's leftover: it is gone
		// before anything of the guest's is touched (orphans.go).
		m.killUnrecordedVMMs(ctx, in.ID, vmms)
		if ok {
			c := m.client(g)
			defer c.Close()
			info, err := c.Describe(ctx)
			if err == nil && info.State == firecracker.StatePaused && in.State == api.StateRunning {
				// A live snapshot/fork paused it and crashed.
				if err := c.Resume(ctx); err != nil {
					m.log.Error("reconcile: resume a VM a crashed live operation paused", "instance", in.ID, "err", err)
				}
			}
			if in.State != api.StateRunning && in.State != api.StatePaused {
				in.State = api.StateRunning
				if err := m.db.UpdateInstance(ctx, in); err != nil {
					m.log.Error("reconcile: record an adopted VM Running", "instance", in.ID, "err", err)
				}
			}
			m.supervise(in, p, true)
			m.log.Info("reconcile: VMM adopted", "instance", in.ID, "pid", p.Pid, "state", in.State)
			return
		}
		if complete(g.Latest()) {
			m.killVMM(ctx, in.ID, 0, g) // clears what it left; frees its uid and cgroup
			if err := sealSnapDir(g, g.Latest()); err != nil {
				m.log.Error("reconcile: seal a Standby snapshot", "instance", in.ID, "err", err)
			}
			if err := sealDisk(g); err != nil {
				m.log.Error("reconcile: seal a Standby disk", "instance", in.ID, "err", err)
			}
			in.State, in.Pid = api.StateStandby, 0
			if in.SnapshotCacheKey == "" {
				in.SnapshotCacheKey, _ = cacheKey(g.Latest())
			}
			m.closeSession(ctx, &in)
			if err := m.db.UpdateInstance(ctx, in); err != nil {
				m.log.Error("reconcile: record Standby", "instance", in.ID, "err", err)
			}
			m.log.Warn("reconcile: VMM gone; complete snapshot found: Standby", "instance", in.ID)
			return
		}
		if err := m.markStopped(ctx, &in, g); err != nil {
			m.log.Error("reconcile: mark Stopped", "instance", in.ID, "err", err)
		}
		m.log.Warn("reconcile: VMM gone and no complete snapshot: Stopped", "instance", in.ID)
	case api.StateStandby:
		if !complete(g.Latest()) {
			if err := m.markStopped(ctx, &in, g); err != nil {
				m.log.Error("reconcile: mark Stopped", "instance", in.ID, "err", err)
			}
			m.log.Warn("reconcile: Standby without a complete snapshot: Stopped", "instance", in.ID)
		}
	}
}

func complete(d guestdir.SnapDir) bool {
	for _, p := range []string{d.VMState(), d.Memory()} {
		if st, err := os.Lstat(p); err != nil || !st.Mode().IsRegular() {
			return false
		}
	}
	return true
}

func (m *Manager) markStopped(ctx context.Context, in *store.Instance, g guestdir.Guest) error {
	var errs []error
	if err := m.killVMM(ctx, in.ID, in.Pid, g); err != nil {
		errs = append(errs, err)
	}
	m.closeSession(ctx, in)
	if err := os.RemoveAll(g.SnapshotsDir()); err != nil {
		errs = append(errs, fmt.Errorf("remove the snapshots dir: %w", err))
	}
	in.State, in.Pid, in.SnapshotCacheKey = api.StateStopped, 0, ""
	if err := m.db.UpdateInstance(ctx, *in); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// sweepDataDirs removes what a crash left half-made under jail/<exec>/ and
// snapshots/, and sets aside what it cannot account for. It deletes only
// what it can prove forkd made:
//   - a real directory with one of forkd's temp names (.tmp-<id>,
//     .tmp-<id>.deleting);
//   - a real directory named by a forkd id that no record claims but the
//     journal names (a create, fork or snapshot whose own cleanup failed);
//   - regular *.tmp files inside the directory of a recorded instance or
//     snapshot.
//
// It gives back its record to a guest dir no record or journal entry
// claims that carries its own fork record (a fork whose unsynced commits a
// power cut lost: restoreForkRecord).
//
// Any other entry with a forkd name (a directory neither record nor journal
// names; a symlink, file or FIFO, which forkd never makes there) is moved to
// <data>/lost+found/ and logged. Entries with other names are not forkd's:
// they are left alone, and logged. Nothing here follows a symlink: ReadDir
// and WalkDir report entries as they are (lstat), and rename, unlink and
// RemoveAll act on the name, not on what a symlink points to.
func (m *Manager) sweepDataDirs(ctx context.Context) error {
	insts, err := m.db.ListInstances(ctx)
	if err != nil {
		return err
	}
	snaps, err := m.db.ListSnapshots(ctx)
	if err != nil {
		return err
	}
	// The reflink probe's temp dir (checkFilesystem, at every start), left
	// by a crash or a power cut that lost its removal: forkd's own name.
	for _, dir := range []string{m.layout.Root(), m.layout.JailsDir()} {
		probes, _ := filepath.Glob(filepath.Join(dir, memfile.ReflinkProbePrefix+"*"))
		records, _ := filepath.Glob(filepath.Join(dir, dirrecord.ProbePrefix+"*")) // checkFilesystem's other probe
		for _, p := range append(probes, records...) {
			if st, err := os.Lstat(p); err == nil && st.IsDir() {
				m.log.Info("reconcile: removing a filesystem probe left behind", "path", p)
				if err := os.RemoveAll(p); err != nil {
					m.log.Error("reconcile: remove reflink probe", "path", p, "err", err)
				}
			}
		}
	}
	recorded := map[string]bool{}
	for _, in := range insts {
		recorded["g/"+in.ID] = true
	}
	for _, s := range snaps {
		recorded["s/"+s.ID] = true
	}
	pooledTrees := 0
	defer func() {
		if pooledTrees > 0 {
			m.log.Info("reconcile: removed the empty fork trees an earlier run made ahead", "trees", pooledTrees)
		}
	}()
	for _, root := range []struct{ dir, tag string }{{m.layout.JailsDir(), "g/"}, {m.layout.SnapshotsDir(), "s/"}} {
		ents, err := os.ReadDir(root.dir)
		if err != nil {
			return fmt.Errorf("reconcile: %w", err)
		}
		for _, e := range ents {
			name := e.Name()
			path := filepath.Join(root.dir, name)
			_, temp := guestdir.TempID(name)
			_, pooled := guestdir.PooledID(name)
			pooled = pooled && root.tag == "g/"
			isID := guestdir.IsForkdID(name)
			realDir := e.Type().IsDir() // the entry itself: a symlink is not a dir here
			switch {
			case !temp && !isID && !pooled:
				m.log.Warn("reconcile: not a forkd name: left alone", "path", path)
				continue
			case !realDir:
				// forkd makes only real directories here.
			case pooled:
				// An empty tree made ahead by a run that did not close its
				// pool (forktrees.go): no VM's.
				pooledTrees++
				if err := os.RemoveAll(path); err != nil {
					m.log.Error("reconcile: remove a pooled fork tree", "path", path, "err", err)
				}
				continue
			case temp:
				m.log.Info("reconcile: removing temp dir", "path", path)
				if err := os.RemoveAll(path); err != nil {
					m.log.Error("reconcile: remove temp dir", "path", path, "err", err)
				}
				continue
			case recorded[root.tag+name]:
				// A recorded VM's dir that another uid owns or can write
				// may hold anything planted: refuse to run on it.
				if err := datadir.Check(path); err != nil {
					return fmt.Errorf("reconcile: %w", err)
				}
				m.removeTempFiles(path)
				continue
			default:
				named, err := m.db.Names(ctx, name)
				if err != nil {
					return fmt.Errorf("reconcile: %w", err)
				}
				if named {
					m.log.Info("reconcile: removing a dir the journal names and no record claims", "path", path)
					if err := os.RemoveAll(path); err != nil {
						m.log.Error("reconcile: remove dir", "path", path, "err", err)
					}
					continue
				}
				if root.tag == "g/" && m.restoreForkRecord(ctx, path, name) {
					m.removeTempFiles(path)
					continue
				}
			}
			dst, err := m.moveToLostFound(root.dir, name)
			if err != nil {
				m.log.Error("reconcile: cannot move an unaccounted entry to lost+found: left in place", "path", path, "err", err)
				continue
			}
			m.log.Warn("reconcile: no record or journal entry accounts for this entry: moved to lost+found",
				"path", path, "type", fileKind(e.Type()), "moved_to", dst)
		}
	}
	return nil
}

// removeTempFiles removes the regular *.tmp files (atomicfile and memfile
// temp names, memory.unshare.tmp) under a recorded instance's or snapshot's
// directory. It walks and removes through os.Root: a VMM still running
// (adopted) owns its guest dir, and a directory it swaps for a symlink
// mid-walk never sends a removal outside dir.
func (m *Manager) removeTempFiles(dir string) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return
	}
	defer root.Close()
	fs.WalkDir(root.FS(), ".", func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() && strings.HasSuffix(d.Name(), ".tmp") {
			m.log.Info("reconcile: removing temp file", "path", filepath.Join(dir, p))
			root.Remove(p)
		}
		return nil
	})
}
