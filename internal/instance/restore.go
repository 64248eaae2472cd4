package instance

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/pager"
	"github.com/forkd/forkd/internal/store"
)

func (m *Manager) restoreAction(ctx context.Context, in *store.Instance, req api.ActionRequest) error {
	return m.restore(ctx, in, req.RestoreBackend, m.cfg.RestoreBackend)
}

// restore wakes a Standby instance (docs/architecture.md §5): a fresh VMM loads
// snapshot-latest (File: the mem-file mapped MAP_PRIVATE; Uffd: served by a
// pager session under the instance's cache key), resumes, and
// snapshot-latest becomes snapshot-base, the next standby's diff base.
// A failure kills the new VMM and closes the session; the instance stays
// Standby (the error goes to the caller and the log; a Standby record holds
// none), nothing deleted, retryable. A mem-file shorter than the VM's RAM is
// refused before anything starts. Caller holds the write lock.
func (m *Manager) restore(ctx context.Context, in *store.Instance, backend, def string) error {
	start := time.Now()
	if in.State != api.StateStandby {
		return invalidState(*in, "restore", api.StateStandby)
	}
	backend, err := restoreBackend(*in, backend, def)
	if err != nil {
		return err
	}
	g, err := m.guest(in.ID)
	if err != nil {
		return err
	}
	latest := g.Latest()
	for _, p := range []string{latest.VMState(), latest.Memory()} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("restore %s: snapshot incomplete: %w", in.Name, err)
		}
	}
	if err := memFileFits(fmt.Sprintf("the snapshot of instance %q", in.Name), latest, in.MemoryMiB); err != nil {
		return fmt.Errorf("restore %s: %w", in.Name, err)
	}
	release, err := m.reserveRunning(ctx, "restore", *in)
	if err != nil {
		return err
	}
	defer release()
	o, err := m.begin(ctx, "restore", in.ID, opPayload{Prev: api.StateStandby})
	if err != nil {
		return err
	}
	in.State, in.RestoreBackend = api.StateRestoring, backend
	if err := m.db.UpdateInstance(ctx, *in); err != nil {
		o.finish(ctx, err)
		return err
	}
	var proc *firecracker.Process
	session := ""
	var pg Pager
	var pf *prefetchRun
	fail := func(err error) error {
		pf.abort()
		if proc != nil {
			err = m.withDeathCause(in.ID, proc, err)
		}
		err = fmt.Errorf("restore %s (%s): %w", in.Name, backend, err)
		u := m.undo("restore", in.ID)
		if proc != nil {
			u.do("kill the VMM", m.killVMM(ctx, in.ID, proc.Pid, g))
		}
		if session != "" && pg != nil {
			u.do("delete the pager session", pg.DeleteSession(ctx, session))
		}
		if proc == nil {
			m.releaseJail(in.ID) // the uid taken for the session's socket
		}
		// The error goes to the caller and the log, not into the record: a
		// Standby instance's error is "" (only Stopped and Error carry one).
		in.State, in.Pid, in.Error, in.PagerSession, in.PagerVersion = api.StateStandby, 0, "", "", ""
		u.do("record Standby again", m.db.UpdateInstance(ctx, *in))
		err = u.join(err)
		o.finish(ctx, err)
		m.log.Warn("restore failed; instance stays on standby", "instance", in.ID, "err", err)
		return err
	}
	if in.SnapshotCacheKey == "" {
		if in.SnapshotCacheKey, err = cacheKey(latest); err != nil {
			return fail(err)
		}
	}
	// The working set: replayed if recorded, else recorded (prefetch.go).
	pf = m.beginPrefetch(in.ID, in.SnapshotCacheKey, latest.Memory(), backend, start)
	load := firecracker.SnapshotLoad{
		SnapshotPath:    g.InVMM(latest.VMState()),
		MemBackend:      firecracker.MemBackend{BackendType: firecracker.BackendFile, BackendPath: g.InVMM(latest.Memory())},
		TrackDirtyPages: true,
	}
	if backend == api.BackendUffd {
		if pg, err = m.pager(ctx); err != nil {
			return fail(err)
		}
		session = in.ID + "-" + newID()[:8]
		// Journal the session before it exists, so a crash here leaves the
		// reconciler its id to close (a pager session outlives the daemon).
		if err := o.step(ctx, "session", &opPayload{Prev: api.StateStandby, Session: session}); err != nil {
			session = ""
			return fail(err)
		}
		req := pager.SessionRequest{SessionID: session, BackingPath: latest.Memory(), CacheKey: in.SnapshotCacheKey}
		pf.sessionRequest(&req)
		if m.jail != nil {
			// A jailed VMM names nothing outside its jail: the session's
			// socket is made in its guest dir (its root), for its uid alone.
			uid, err := m.jail.uids.Acquire(in.ID)
			if err != nil {
				session = ""
				return fail(fmt.Errorf("%w: %v: stop or stand by a VM, or widen jail_uid_range", api.ErrJailUIDsExhausted, err))
			}
			req.SocketDir, req.SocketOwner = g.Dir, &pager.SocketOwner{UID: uid, GID: uid}
		}
		sock, err := pg.CreateSession(ctx, req)
		if err != nil {
			session = ""
			return fail(fmt.Errorf("pager session: %w", err))
		}
		load.MemBackend = firecracker.MemBackend{BackendType: firecracker.BackendUffd, BackendPath: g.InVMM(sock)}
	}
	// A File restore's working set is read ahead before the VMM exists.
	pf.readAhead()
	// No VMM runs for a Standby instance, so a pin left by one that died
	// while the daemon was down is stale; the new VMM maps latest's inode.
	m.removeInGuest(g, g.MappedPin())
	if err := m.prepareTAP(*in); err != nil {
		return fail(err)
	}
	if proc, err = m.launch(ctx, *in, g); err != nil {
		return fail(err)
	}
	if err := o.step(ctx, "launched", &opPayload{Prev: api.StateStandby, Pid: proc.Pid, Session: session}); err != nil {
		return fail(err)
	}
	// The vmstate holds the vsock socket's path relative to the VM's dir;
	// where the release can, say so again, so the device binds this VM's
	// socket whatever path the snapshot recorded.
	if in.VsockCID != 0 && proc.Version.Supports(firecracker.FeatureVsockOverride) {
		load.VsockOverride = &firecracker.VsockOverride{UDSPath: g.VsockRel()}
	}
	c := m.client(g)
	defer c.Close()
	if err := c.LoadSnapshot(ctx, load); err != nil {
		return fail(m.withSessionEnd(ctx, pg, session, snapshotReleaseHint(err, proc.Version)))
	}
	if pg != nil {
		// The VMM sent its uffd with the load; a pager that refused the
		// handshake has ended the session: say why now, rather than resume
		// a VM whose first fault would hang.
		if err := pg.WaitServing(ctx, session); err != nil {
			return fail(fmt.Errorf("pager session %s: %w", session, err))
		}
	}
	// The VMM reopened the TAP by the name in the vmstate, in its own
	// namespace: bring it up now, before the guest runs, so its first
	// packet out and the first one in both pass.
	if err := m.activateTAP(*in); err != nil {
		return fail(err)
	}
	if err := c.Resume(ctx); err != nil {
		return fail(err)
	}
	if err := o.step(ctx, "resumed", nil); err != nil {
		return fail(err)
	}
	in.Pid, in.PagerSession = proc.Pid, session
	if pg != nil {
		in.PagerVersion = pg.Version()
	}
	if err := m.finishRestore(ctx, o, in); err != nil {
		pf.abort()
		return err
	}
	pf.follow(*in, pg)
	return nil
}

// finishRestore makes the loaded snapshot the retained diff base and records
// the instance Running. The reconciler runs it for a restore that crashed
// after step "resumed" with its VMM still alive. It always finishes the
// journal entry: done, or rolled back (rollbackRestore) and failed.
func (m *Manager) finishRestore(ctx context.Context, o *op, in *store.Instance) error {
	g, err := m.guest(in.ID)
	if err != nil {
		o.finish(ctx, err)
		return err
	}
	// The VMM runs and owns the guest dir: rename and remove by name only.
	latest, base := g.Latest(), g.Base()
	renamed := false
	if _, err := os.Lstat(latest.Dir); err == nil {
		if err := m.removeInGuest(g, base.Dir); err != nil {
			return m.rollbackRestore(ctx, o, in, g, renamed, fmt.Errorf("restore %s: drop the old base: %w", in.Name, err))
		}
		if err := m.renameInGuest(g, latest.Dir, base.Dir); err != nil {
			return m.rollbackRestore(ctx, o, in, g, renamed, fmt.Errorf("restore %s: keep base: %w", in.Name, err))
		}
		renamed = true
	} else if !errors.Is(err, os.ErrNotExist) {
		return m.rollbackRestore(ctx, o, in, g, renamed, fmt.Errorf("restore %s: %w", in.Name, err))
	}
	in.State, in.Error, in.MemoryCheck = api.StateRunning, "", "ok"
	err = m.fault("restore:record")
	if err == nil {
		err = m.db.UpdateInstance(ctx, *in)
	}
	if err != nil {
		return m.rollbackRestore(ctx, o, in, g, renamed, fmt.Errorf("restore %s: record Running: %w", in.Name, err))
	}
	o.finish(ctx, nil)
	if p := m.proc(in.ID); p != nil {
		m.supervise(*in, p, false)
	}
	m.log.Info("instance restored", "instance", in.ID, "backend", in.RestoreBackend, "pid", in.Pid)
	return nil
}

// rollbackRestore undoes a restore that could not be finished after its VM
// resumed: the snapshot goes back to snapshot-latest (if it was renamed to
// the base), the VMM is killed and the pager session closed, and the
// instance is recorded Standby, retryable, as a failed restore leaves it.
// The journal entry is finished with err and every undo step that failed.
func (m *Manager) rollbackRestore(ctx context.Context, o *op, in *store.Instance, g guestdir.Guest, renamed bool, err error) error {
	u := m.undo("restore", in.ID)
	if renamed {
		u.do("rename the base back to snapshot-latest", errors.Join(m.fault("restore:rename-back"), m.renameInGuest(g, g.Base().Dir, g.Latest().Dir)))
	}
	u.do("kill the VMM", m.killVMM(ctx, in.ID, in.Pid, g))
	m.closeSession(ctx, in)
	in.State, in.Pid, in.Error = api.StateStandby, 0, ""
	u.do("record Standby again", m.db.UpdateInstance(ctx, *in))
	err = u.join(err)
	o.finish(ctx, err)
	m.log.Warn("restore could not be finished; instance back on standby", "instance", in.ID, "err", err)
	return err
}

// restoreBackend is the backend a restore of in uses: asked (a request's),
// else def (the daemon's default). Firecracker maps no snapshot of
// hugetlbfs-backed memory from its mem-file: a VM backed by huge pages
// restores through the pager only, so uffd is its default whatever def
// says, and a request for file is refused before anything changes.
func restoreBackend(in store.Instance, asked, def string) (string, error) {
	b := asked
	if b == "" {
		b = def
		if in.Huge() {
			b = api.BackendUffd
		}
	}
	switch {
	case b != api.BackendFile && b != api.BackendUffd:
		return "", fmt.Errorf("%w: restore backend %q: want file or uffd", api.ErrInvalid, b)
	case b == api.BackendFile && in.Huge():
		return "", fmt.Errorf("%w: %s's memory is backed by %s huge pages, which restore only with restore_backend uffd", api.ErrInvalid, in.Name, in.HugePages)
	}
	return b, nil
}

// hugePagesAPI is the API's name of a record's huge pages.
func hugePagesAPI(h string) string {
	if h == "" {
		return api.HugePagesNone
	}
	return h
}
