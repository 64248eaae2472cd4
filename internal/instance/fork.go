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
	return m.forkOne(ctx, m.admitInstanceFork, ref, req)
}

// ForkSnapshot forks a store snapshot, under the snapshot's read lock (so
// it is not deleted mid-fork; it may be deleted the moment this returns).
func (m *Manager) ForkSnapshot(ctx context.Context, ref string, req api.ForkRequest) (api.Instance, error) {
	return m.forkOne(ctx, m.admitSnapshotFork, ref, req)
}

// admitFork admits forks of ref: admitInstanceFork or admitSnapshotFork.
type admitFork func(ctx context.Context, ref string, ask forkAsk) (*forkAdmission, error)

// forkOne makes one fork of ref, admitted by admit, and brings it to its
// target state.
func (m *Manager) forkOne(ctx context.Context, admit admitFork, ref string, req api.ForkRequest) (api.Instance, error) {
	start := time.Now()
	defer m.observe("fork", start)
	defer m.netOpStart()()
	defer m.treeOpStart()()
	ctx = context.WithoutCancel(ctx)
	a, err := admit(ctx, ref, forkAsk{fromRunning: req.FromRunning, target: req.TargetState, backend: req.RestoreBackend, n: 1})
	if err != nil {
		return api.Instance{}, err
	}
	defer a.releaseCap()
	fork, err := m.fork(ctx, a.ids[0], a.pooled > 0, req, a.tmpl, a.spec)
	a.release()
	if err != nil {
		return api.Instance{}, err
	}
	return m.applyTarget(ctx, fork, a.target, req.RestoreBackend)
}

// forkAsk is what a fork call asks of its admission: n forks (one, or a
// batch's) to target (or the source's default), restored with backend.
type forkAsk struct {
	fromRunning     bool
	batch           bool // a batch's forks (none of a running source)
	target, backend string
	n               int
}

// forkAdmission is a source admitted for forks: locked (release unlocks it;
// the forks' files are made under the lock), with capacity reserved for each
// fork (releaseCap).
type forkAdmission struct {
	ids        []string // the forks' ids, one per fork asked for
	pooled     int      // the first pooled of ids come with their trees made (forktrees.go)
	tmpl       store.Instance
	spec       forkSpec
	target     string
	release    func() // idempotent
	releaseCap func()
}

// reserveForks reserves capacity for each of ids, all or none.
func (m *Manager) reserveForks(ctx context.Context, ids []string, req capacity.Request) (func(), error) {
	var releases []func()
	releaseAll := func() {
		for _, r := range releases {
			r()
		}
	}
	for _, id := range ids {
		req.ID = id
		r, err := m.reserveCapacity(ctx, "fork", req)
		if err != nil {
			releaseAll()
			if len(ids) > 1 {
				err = fmt.Errorf("a batch of %d forks: %w", len(ids), err)
			}
			return nil, err
		}
		releases = append(releases, r)
	}
	return releaseAll, nil
}

// admitInstanceFork resolves and locks instance ref for forks, checks it can
// be forked as asked, and reserves the forks' capacity.
func (m *Manager) admitInstanceFork(ctx context.Context, ref string, ask forkAsk) (*forkAdmission, error) {
	// Trace regions (forkd serve --profile) name where a fork's time goes.
	defer trace.StartRegion(ctx, "fork: admit").End()
	probe, err := m.resolveInstance(ctx, ref)
	if err != nil {
		return nil, apiErr(err)
	}
	live := oneOf(probe.State, api.StateRunning, api.StatePaused)
	if live && ask.batch {
		return nil, fmt.Errorf("%w: instance %q is %s, and a batch forks no running instance; stand it by first, or fork it live once (from_running) and fork that fork in a batch", api.ErrInvalidState, probe.Name, probe.State)
	}
	if live && !ask.fromRunning {
		return nil, fmt.Errorf("%w: instance %q is %s; stand it by first or pass from_running", api.ErrInvalidState, probe.Name, probe.State)
	}
	src, unlockSrc, err := m.lockResolved(ctx, probe, live)
	if err != nil {
		return nil, err
	}
	ok := false
	a := &forkAdmission{release: sync.OnceFunc(unlockSrc)}
	defer func() {
		if !ok {
			a.release()
			m.returnTrees(a.ids[:a.pooled]) // no fork built in them
		}
	}()
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
		return nil, invalidState(src, "fork", api.StateStandby, api.StateRunning+" (from_running)", api.StateStopped)
	}
	if ask.target != "" {
		target = ask.target
	}
	hasMemory := src.State != api.StateStopped && src.State != api.StateCreated
	if err := checkTarget(target, hasMemory); err != nil {
		return nil, err
	}
	if err := m.checkForkBackend(target, hasMemory, src, ask.backend); err != nil {
		return nil, err
	}
	g, err := m.guest(src.ID)
	if err != nil {
		return nil, err
	}
	if hasMemory && !live {
		// Never hand a damaged mem-file on to a fork.
		if err := memFileFits(fmt.Sprintf("the snapshot of instance %q", src.Name), g.Latest(), src.MemoryMiB); err != nil {
			return nil, fmt.Errorf("fork of %q: %w", src.Name, err)
		}
	}
	a.ids, a.pooled = m.forkIDs(ask.n, hasMemory && !live)
	cost := m.forkCost(g.Rootfs(), src.MemoryMiB, hasMemory)
	if live {
		cost += m.snapshotCost(g.Base(), src.MemoryMiB)
	}
	if a.releaseCap, err = m.reserveForks(ctx, a.ids, capacity.Request{MemoryMiB: src.MemoryMiB, Vcpus: src.Vcpus,
		Runs: target == api.StateRunning, DiskBytes: cost, HugePages: src.Huge()}); err != nil {
		return nil, err
	}
	files := forkFiles{rootfs: g.Rootfs()}
	if _, err := os.Stat(g.Kernel()); err == nil {
		files.kernel = g.Kernel()
	}
	a.tmpl = src
	a.tmpl.Source = "instance:" + src.ID
	a.spec = forkSpec{files: files}
	switch {
	case live:
		base := g.Base()
		a.spec.files.from = &base
		a.spec.live = func(ctx context.Context, o *op, build func() error) (string, error) {
			return m.updateBaseLive(ctx, o, &src, build)
		}
	case hasMemory:
		latest := g.Latest()
		a.spec.files.from, a.spec.key = &latest, src.SnapshotCacheKey
	}
	a.target, ok = target, true
	return a, nil
}

// admitSnapshotFork is admitInstanceFork for a store snapshot, which it
// read-locks (so it is not deleted mid-fork).
func (m *Manager) admitSnapshotFork(ctx context.Context, ref string, ask forkAsk) (*forkAdmission, error) {
	defer trace.StartRegion(ctx, "fork: admit").End()
	sn, err := m.resolveSnapshot(ctx, ref)
	if err != nil {
		return nil, apiErr(err)
	}
	sn, unlockSnap, err := m.lockSnapshot(ctx, sn.ID, false)
	if err != nil {
		return nil, apiErr(err)
	}
	ok := false
	a := &forkAdmission{release: sync.OnceFunc(unlockSnap)}
	defer func() {
		if !ok {
			a.release()
			m.returnTrees(a.ids[:a.pooled]) // no fork built in them
		}
	}()
	if sn.State == snapCreating {
		return nil, fmt.Errorf("%w: snapshot %q is still being created", api.ErrInvalidState, sn.Name)
	}
	target := ask.target
	if target == "" {
		target = api.StateStandby
	}
	if err := checkTarget(target, true); err != nil {
		return nil, err
	}
	if err := m.checkForkBackend(target, true, store.Instance{Name: sn.Name, HugePages: sn.HugePages}, ask.backend); err != nil {
		return nil, err
	}
	sd, err := m.layout.Snapshot(sn.ID)
	if err != nil {
		return nil, err
	}
	broken, raw := sn.State == snapBroken, false
	if !broken {
		broken, raw = m.markIfBroken(ctx, &sn)
	}
	if broken {
		return nil, brokenError(sn, sd)
	}
	a.ids, a.pooled = m.forkIDs(ask.n, true)
	cost := m.forkCost(sd.Rootfs(), sn.MemoryMiB, true)
	if !raw {
		cost += int64(sn.MemoryMiB) << 20 // materialised once, for this and later forks
	}
	if a.releaseCap, err = m.reserveForks(ctx, a.ids, capacity.Request{MemoryMiB: sn.MemoryMiB, Vcpus: sn.Vcpus,
		Runs: target == api.StateRunning, DiskBytes: cost, HugePages: sn.Huge()}); err != nil {
		return nil, err
	}
	defer func() {
		if !ok {
			a.releaseCap()
		}
	}()
	// A raw mem-file markIfBroken found whole stays so under the
	// snapshot's read lock (compression drops it only under the write
	// lock): only a compressed one is materialised, and checked after.
	if !raw {
		if err := m.materialise(ctx, sn.ID, sd); err != nil {
			return nil, err
		}
		if err := memFileFits(fmt.Sprintf("snapshot %q", sn.Name), sd, sn.MemoryMiB); err != nil {
			return nil, fmt.Errorf("fork of snapshot %q: %w", sn.Name, err)
		}
	}
	files := forkFiles{from: &sd, rootfs: sd.Rootfs()}
	if _, err := os.Stat(sd.Kernel()); err == nil {
		files.kernel = sd.Kernel()
	}
	a.tmpl = store.Instance{
		Vcpus: sn.Vcpus, MemoryMiB: sn.MemoryMiB, Kernel: sn.Kernel, BootArgs: sn.BootArgs,
		Source: "snapshot:" + sn.ID, Networked: sn.NetGuest != "", NetGuest: sn.NetGuest, NetMAC: sn.NetMAC,
		Image:     sn.Image,
		VsockCID:  sn.VsockCID,
		HugePages: sn.HugePages,
	}
	a.spec = forkSpec{files: files, key: sn.SnapshotCacheKey}
	a.target, ok = target, true
	return a, nil
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
// rename of its directory into place.
//
// Where the data dir keeps directory records (fsAdvice.records), a fork
// with no network makes one commit (oneCommit). Its directory carries its
// finished record (dirrecord, written before the rename and made durable
// by it); the rename needs nothing of the store, so it comes first, and
// the one commit (journal entry begun and closed, and the finished record:
// the name check is this insert) runs its statements during the rename's
// fsync and commits, unsynced, after it (store.GroupAfter). A crash or a
// power cut that loses that commit leaves the directory under its own
// name, which only a complete, durable fork has, and the reconciler
// restores the record from it (restoreForkRecord). A failure after the
// rename (a taken name) removes the dir, which first loses its own name
// (removePartialFiles).
//
// Any other fork makes two commits. Its first (the journal entry naming
// the fork, with its Forking record, which already holds everything the
// finished record holds but its state) is made once the mem-file is shared
// (its fork_mode known), while the rest of the directory is built, and the
// directory takes the fork's own name only once that commit is made. A
// networked fork's first commit also takes its network slot (a warm one
// when the pool has one) and its publishes; its network is made once that
// commit is made, and where the data dir keeps records its directory's
// record, which holds the slot and the publishes too, is written after it,
// before the rename: neither commit then waits for an fsync
// (store.GroupUnsynced), and the reconciler restores a record a power cut
// lost from the directory, or, when the first commit survived, completes
// it (rollForwardFork). Where the data dir keeps none, the first commit is
// synced, and only the last is not. Every commit is shared with whatever
// other forks commit at the same moment (store.Group).
//
// A live fork journals and records itself first, and makes its network,
// before it pauses its source; its last commit is synced.
func (m *Manager) fork(ctx context.Context, id string, pooled bool, req api.ForkRequest, tmpl store.Instance, spec forkSpec) (store.Instance, error) {
	job, err := m.newForkJob(id, pooled, req.Name, req.Publish, tmpl)
	if err != nil {
		if pooled {
			m.returnTrees([]string{id})
		}
		return store.Instance{}, err
	}
	if spec.live != nil {
		return m.forkLive(ctx, job, spec)
	}
	job.oneCommit = m.fs.records && !job.rec.Networked
	err = m.forkJournalled(ctx, job, m.buildFork(ctx, job, spec, nil))
	if err != nil {
		return m.failFork(ctx, job, err)
	}
	// The last commit's statements run while the dir takes its own name
	// and the rename is made durable; it commits only on the go-ahead
	// (store.GroupAfter), after that fsync, as in a batch (forkBatch).
	rec := completed(job.rec, job.res)
	unit := finishForkUnit(job.o, rec)
	if job.oneCommit {
		unit = oneCommitForkUnit(rec)
	}
	err = m.commitAfter(ctx, "fork:committing", unit, func() error {
		// The fork's own name only once the journal names it, or, for a
		// fork of one commit, once its dir carries its record.
		var err error
		trace.WithRegion(ctx, "fork: rename", func() { err = atomicfile.Rename(job.tmp.Jail, job.final.Jail) })
		if err == nil {
			crashPoint("fork", "files") // test hook: the fork's dir is durable, its record still Forking (or none yet)
			err = m.fault("fork:renamed")
		}
		return err
	})
	if err != nil {
		return m.failFork(ctx, job, err)
	}
	crashPoint("fork", "committed") // test hook (crashhook.go)
	m.forked(job, rec, false)
	return rec, nil
}

// forkJob is one fork as it is made. fork runs its steps for one fork;
// forkBatch runs each step for every fork of a batch before the next.
type forkJob struct {
	id         string
	rec        store.Instance // Forking until its last commit
	pubs       []store.Publish
	tmp, final guestdir.Guest
	pooled     bool // tmp is a pooled tree, made ahead (forktrees.go)
	res        memfile.ShareResult
	fresh      []string     // the new inodes buildForkDir made
	journal    *forkJournal // its first commit; nil until the mem-file is shared
	o          *op          // its journal entry, once that commit is made
	// batch: one fork of a batch (forkBatch), whose first commit is synced
	// and which neither rolls forward nor carries a directory record.
	batch bool
	// oneCommit: a fork with no network whose directory carries its record
	// (fsAdvice.records) makes one commit, after its rename (fork).
	oneCommit bool
}

// newForkJob checks what a fork of tmpl named name (its id if "") asks,
// and makes its Forking record. pooled: id came with its tree made, where
// the fork builds (forktrees.go).
func (m *Manager) newForkJob(id string, pooled bool, name string, publish []api.PortPublish, tmpl store.Instance) (*forkJob, error) {
	if name == "" {
		name = id // an unnamed instance is named by its own id
	} else if err := validName("instance", name); err != nil {
		return nil, err
	}
	final, err := m.guest(id)
	if err != nil {
		return nil, err
	}
	tempGuest := m.layout.TempGuest
	if pooled {
		tempGuest = m.layout.PooledGuest
	}
	tmp, err := tempGuest(id)
	if err != nil {
		return nil, err
	}
	// A fork of a networked source is networked with the source's guest
	// identity (the guest keeps it in memory); it never inherits
	// publishes, and gets its own only if asked.
	var pubs []store.Publish
	if len(publish) > 0 {
		if !tmpl.Networked {
			return nil, fmt.Errorf("%w: publish needs a network, and %s has none", api.ErrInvalid, tmpl.Source)
		}
	}
	if tmpl.Networked {
		if m.net() == nil {
			return nil, fmt.Errorf("%w: %s is networked but networking is off on this daemon (%s)", api.ErrInvalid, tmpl.Source, m.cfg.NetworkOffReason)
		}
		if pubs, err = m.checkPublishes(publish); err != nil {
			return nil, err
		}
	}
	rec := store.Instance{
		ID: id, Name: name, State: api.StateForking, Vcpus: tmpl.Vcpus, MemoryMiB: tmpl.MemoryMiB,
		Kernel: tmpl.Kernel, Rootfs: tmpl.Rootfs, BootArgs: tmpl.BootArgs, CreatedAt: time.Now().UTC(),
		Source: tmpl.Source, MemoryCheck: tmpl.MemoryCheck,
		Networked: tmpl.Networked, NetGuest: tmpl.NetGuest, NetMAC: tmpl.NetMAC,
		Image:     tmpl.Image,
		VsockCID:  tmpl.VsockCID,  // its vmstate has the source's vsock device
		HugePages: tmpl.HugePages, // and its memory's pages
	}
	rec.RestoreBackend, _ = restoreBackend(rec, "", m.cfg.ForkRestoreBackend)
	return &forkJob{id: id, rec: rec, pubs: pubs, tmp: tmp, final: final, pooled: pooled}, nil
}

// failFork removes what a failed fork made and journals its failure.
func (m *Manager) failFork(ctx context.Context, job *forkJob, err error) (store.Instance, error) {
	return store.Instance{}, m.undoFork(ctx, job, fmt.Errorf("fork %q from %s: %w", job.rec.Name, job.rec.Source, err))
}

// undoFork is failFork's work: it removes what job made, journals err as
// its outcome, and returns err with any step of the removal that failed
// joined to it (as an API error when nothing was journalled: a taken name).
func (m *Manager) undoFork(ctx context.Context, job *forkJob, err error) error {
	u := m.undo("fork", job.id)
	if job.o == nil { // nothing journalled: its temp dir may exist, or a fork of one commit's renamed dir
		u.do("remove the partial fork's files", m.removePartialFiles(job.id))
		return u.join(apiErr(err))
	}
	u.do("remove the partial fork", m.removePartial(ctx, job.id))
	err = u.join(err)
	job.o.finish(ctx, err)
	return err
}

// buildFork builds a fork's directory under its temp name and, once its
// mem-file is shared, starts its first commit (beginFork; none for a fork
// of one commit) while the rest is built; then, unless the fork is
// networked, writes the directory's record and makes the tree durable
// (syncForkTree), while that commit is made.
// Its source files come from srcs (nil: opened for this fork alone). Its
// error is forkJournalled's to handle.
func (m *Manager) buildFork(ctx context.Context, job *forkJob, spec forkSpec, srcs sources) error {
	records := m.fs.records
	r := trace.StartRegion(ctx, "fork: build")
	build := m.buildForkDir
	if srcs != nil { // a batch's, shared by its forks
		build = func(tmp guestdir.Guest, made bool, f forkFiles, shared func(memfile.ShareResult)) (memfile.ShareResult, []string, error) {
			return m.buildForkDirFrom(srcs, tmp, made, f, shared)
		}
	}
	var err error
	job.res, job.fresh, err = build(job.tmp, job.pooled, spec.files, func(res memfile.ShareResult) {
		finishRecord(&job.rec, res, spec.key)
		if job.batch || job.oneCommit {
			return // journalled with its batch (forkBatch), or in its one commit (fork)
		}
		synced := !records && os.Getenv(UnsafeUnsyncedForkBeginEnv) != "1" // the env: a twin test only
		job.journal = m.beginFork(ctx, job.rec, job.pubs, opPayload{Source: job.rec.Source, RollForward: true}, synced)
	})
	r.End()
	records = records && !job.batch
	if err == nil && records && !job.rec.Networked {
		// The fork's finished record, in its own directory: made durable
		// by the rename's fsync, it is what the reconciler restores the
		// fork from if a power cut loses the unsynced commits.
		err = writeForkRecord(job.tmp, completed(job.rec, job.res), nil)
	}
	if err == nil && !job.rec.Networked { // fsync the new inodes and the dir while the journal commits
		trace.WithRegion(ctx, "fork: sync tree", func() { err = syncForkTree(job.tmp.Jail, job.fresh) })
	}
	return err
}

// forkJournalled waits for a fork's first commit (built: buildFork's
// error) and, for a networked fork, makes its network, its directory's
// record and its durable tree. On an error the fork is the caller's to
// fail (failFork): job.o says whether it was journalled.
func (m *Manager) forkJournalled(ctx context.Context, job *forkJob, built error) error {
	if !job.batch { // a batch's forks are journalled together (forkBatch)
		if job.journal == nil {
			return built
		}
		var o *op
		var jerr error
		trace.WithRegion(ctx, "fork: wait for the journal", func() { o, jerr = job.journal.wait() })
		if jerr != nil {
			return jerr
		}
		job.o, job.rec = o, job.journal.rec // a networked fork's slot, taken in the commit
	}
	if built != nil || !job.rec.Networked {
		return built
	}
	// A networked fork's record names the slot its commit took, so it is
	// written after that commit, and the tree is made durable after the
	// record (btrfs makes a directory's attributes durable with that
	// directory's own fsync).
	err := m.setupNetwork(ctx, job.o, job.rec, job.pubs)
	if err == nil && m.fs.records && !job.batch {
		err = writeForkRecord(job.tmp, completed(job.rec, job.res), job.pubs)
	}
	if err == nil {
		trace.WithRegion(ctx, "fork: sync tree", func() { err = syncForkTree(job.tmp.Jail, job.fresh) })
	}
	return err
}

// forked logs a made fork.
func (m *Manager) forked(job *forkJob, rec store.Instance, live bool) {
	m.countFallback(job.res, "fork", job.id)
	m.log.Info("forked", "instance", job.id, "name", rec.Name, "source", rec.Source, "mode", job.res.Mode, "live", live)
}

// forkLive is fork for a running source: it journals and records the fork
// and makes its network before it pauses the source, builds the fork's
// directory while the source is paused, and syncs its last commit.
func (m *Manager) forkLive(ctx context.Context, job *forkJob, spec forkSpec) (store.Instance, error) {
	o, err := m.begin(ctx, "fork", job.id, opPayload{Source: job.rec.Source, Live: true})
	if err != nil {
		return store.Instance{}, err
	}
	if err := m.createRecord(ctx, &job.rec, job.pubs); err != nil {
		o.finish(ctx, err)
		return store.Instance{}, err
	}
	job.o = o
	// The network before the files: a live source is paused only while
	// its memory is copied, never while a namespace is made.
	if err := m.setupNetwork(ctx, o, job.rec, job.pubs); err != nil {
		return m.failFork(ctx, job, err)
	}
	build := func() error {
		var err error
		if job.res, job.fresh, err = m.buildForkDir(job.tmp, false, spec.files, nil); err != nil {
			return err
		}
		if err := syncForkTree(job.tmp.Jail, job.fresh); err != nil {
			return err
		}
		return atomicfile.Rename(job.tmp.Jail, job.final.Jail)
	}
	if spec.key, err = spec.live(ctx, o, build); err != nil {
		return m.failFork(ctx, job, err)
	}
	finishRecord(&job.rec, job.res, spec.key)
	crashPoint("fork", "files") // test hook: the fork's dir is durable, its record still Forking
	rec := completed(job.rec, job.res)
	if err := m.db.Group(ctx, "fork:committing", finishForkUnit(o, rec)); err != nil {
		return m.failFork(ctx, job, err)
	}
	crashPoint("fork", "committed") // test hook (crashhook.go)
	m.forked(job, rec, true)
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
// mem-file (src, opened from srcs) the way Config.ForkStrategy says; the result's Mode is the
// fork's fork_mode. Nothing is fsynced: a result other than a hardlink is a
// new inode for buildForkDir's caller to fsync.
//
// The default shares the inode when it is sealed and clones it (sealing the
// clone) when a VMM may still write it (a live fork's fresh base): see
// inodes.go. Every fork's mem-file is sealed.
func (m *Manager) shareMemFile(srcs sources, src, dst string) (memfile.ShareResult, error) {
	if m.cfg.ForkStrategy == ForkStrategyHardlink {
		return m.shareFrom(srcs, "mem-file", src, dst, false)
	}
	f, _, release, err := srcs.source("mem-file", src)
	if err != nil {
		return memfile.ShareResult{}, err
	}
	defer release()
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

// commitAfter is a fork's last commit, unsynced, made while durable runs:
// the committer runs unit's statements at once and commits them only once
// durable has returned nil (store.GroupAfter), so nothing of unit is
// visible before what durable makes is durable. durable must make no store
// write: the committer holds the store's writer until it returns. It
// returns durable's error, else the commit's.
func (m *Manager) commitAfter(ctx context.Context, label string, unit func(*store.Tx) error, durable func() error) error {
	ready, committed := make(chan error, 1), make(chan error, 1)
	go func() {
		committed <- m.db.GroupAfter(ctx, label, store.After{Ready: ready, Unsynced: true}, unit)
	}()
	err := durable()
	ready <- err
	trace.WithRegion(ctx, "fork: last commit", func() {
		if cerr := <-committed; err == nil {
			err = cerr
		}
	})
	return err
}
