package instance

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime/trace"
	"sync"
	"syscall"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/forkd/forkd/internal/memfile"
	"github.com/forkd/forkd/internal/store"
)

// ForkInstanceBatch makes req.Count forks of instance ref in one call
// (a Standby source, or a Stopped or Created one for disk-only forks; a
// running source is forked live one fork at a time), named
// req.Name-1..req.Name-Count: every fork, or an error and none (forkBatch).
func (m *Manager) ForkInstanceBatch(ctx context.Context, ref string, req api.ForkBatchRequest) ([]api.Instance, error) {
	return m.forkMany(ctx, m.admitInstanceFork, ref, req)
}

// ForkSnapshotBatch is ForkInstanceBatch for a store snapshot.
func (m *Manager) ForkSnapshotBatch(ctx context.Context, ref string, req api.ForkBatchRequest) ([]api.Instance, error) {
	return m.forkMany(ctx, m.admitSnapshotFork, ref, req)
}

// forkMany checks a batch request, admits its forks of ref with admit, and
// makes them (forkAdmittedBatch).
func (m *Manager) forkMany(ctx context.Context, admit admitFork, ref string, req api.ForkBatchRequest) ([]api.Instance, error) {
	start := time.Now()
	defer m.observe("fork_batch", start)
	defer m.netOpStart()()
	defer m.treeOpStart()()
	ctx = context.WithoutCancel(ctx)
	if err := req.Validate(); err != nil {
		return nil, err
	}
	a, err := admit(ctx, ref, forkAsk{batch: true, target: req.TargetState, backend: req.RestoreBackend, n: req.Count})
	if err != nil {
		return nil, err
	}
	return m.forkAdmittedBatch(ctx, a, req)
}

// forkAdmittedBatch makes an admitted batch's forks under the source's
// lock, then brings them to their target state; if any of them cannot be
// brought there, every fork of the batch is deleted.
func (m *Manager) forkAdmittedBatch(ctx context.Context, a *forkAdmission, req api.ForkBatchRequest) ([]api.Instance, error) {
	defer a.releaseCap()
	recs, err := m.forkBatch(ctx, a.ids, a.pooled, req.Names(), a.tmpl, a.spec)
	a.release()
	if err != nil {
		return nil, err
	}
	out := make([]api.Instance, len(recs))
	errs := make([]error, len(recs))
	eachFork(len(recs), forkTargetWorkers, func(i int) { out[i], errs[i] = m.applyTarget(ctx, recs[i], a.target, req.RestoreBackend) })
	if err := errors.Join(errs...); err != nil {
		for i, rec := range recs {
			if errs[i] == nil { // applyTarget removed the ones it failed
				if derr := m.DeleteInstance(ctx, rec.ID); derr != nil {
					m.log.Error("fork batch: remove a fork after another's failed target state", "instance", rec.ID, "err", derr)
				}
			}
		}
		return nil, fmt.Errorf("a batch of %d forks: target state %s: %w (every fork of the batch removed)", len(recs), a.target, err)
	}
	return out, nil
}

// forkBatchWorkers bounds how many of a batch's forks are built at once:
// building is a few metadata syscalls per fork, so a few workers keep the
// CPUs busy without a goroutine per fork contending for them.
const forkBatchWorkers = 4

// forkTargetWorkers bounds how many of a batch's forks are brought to their
// target state at once. A restore or a start mostly waits (for its VMM to
// load the snapshot and answer), so a batch brings its forks up together,
// as the same forks made by separate calls would be; the bound only keeps
// a very large batch from launching every VMM in the same instant.
const forkTargetWorkers = 32

// eachFork runs fn(0..n-1) on up to workers goroutines.
func eachFork(n, workers int, fn func(i int)) {
	var wg sync.WaitGroup
	next := make(chan int)
	for range min(n, workers) {
		wg.Go(func() {
			for i := range next {
				fn(i)
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
}

// forkBatch makes a fork of spec (not a live one) for each of ids (the
// first pooled with their trees made, forktrees.go), named names, with
// fork's steps taken for every fork of the batch before the next: one
// synced commit journals every fork (beginBatch) while every directory is
// built, then every directory is renamed into place and one fsync of their
// parent makes all of them durable, and one last commit completes them all
// (its statements run during the renames, its COMMIT only after that fsync,
// and it is not synced).
//
// The batch is all or none, across a crash or a power cut too, and it has
// two durable points: the first commit, and the fsync of the renames.
//   - The first commit names every fork of the batch (opPayload.Batch and
//     BatchSize in each entry) and holds each one's Forking record with all
//     the finished record holds but its state and its final fork_mode (the
//     one its fork_strategy gives). It is durable before any directory
//     takes its own name, so the reconciler can always find every fork of
//     the batch.
//   - Once the renames are durable, every fork is whole on disk: the last
//     commit only says so, and a power cut that loses it leaves what the
//     reconciler completes the batch from (rollForwardBatches): every
//     entry of the batch open, every directory under its own name. Before
//     that fsync, some renames may be lost and others not; the reconciler
//     then finds the batch incomplete and removes every fork of it.
//
// So the batch is acknowledged after two log forces, not three, and no
// fork of it is ever kept or lost alone.
func (m *Manager) forkBatch(ctx context.Context, ids []string, pooled int, names []string, tmpl store.Instance, spec forkSpec) ([]store.Instance, error) {
	if spec.live != nil {
		m.returnTrees(ids[:pooled])
		return nil, fmt.Errorf("%w: a running source is forked live one fork at a time, not in a batch", api.ErrInvalid)
	}
	jobs := make([]*forkJob, len(ids))
	for i, id := range ids {
		job, err := m.newForkJob(id, i < pooled, names[i], nil, tmpl)
		if err != nil {
			m.returnTrees(ids[:pooled]) // nothing built in any of them yet
			return nil, err
		}
		job.batch = true
		// What the reconciler completes the fork with if the last commit
		// is lost; building learns the mode for the last commit itself.
		finishRecord(&job.rec, memfile.ShareResult{Mode: m.expectedForkMode(spec)}, spec.key)
		jobs[i] = job
	}
	// The batch's first commit, made while its dirs are built.
	journal := m.beginBatch(ctx, jobs)
	root, err := m.openDataRoot()
	if err != nil {
		journal.wait(m, jobs)
		return nil, m.failBatch(ctx, jobs, err)
	}
	srcs := newSourceCache(root) // each sealed source opened once, for every fork
	built := make([]error, len(jobs))
	eachFork(len(jobs), forkBatchWorkers, func(i int) { built[i] = m.buildFork(ctx, jobs[i], spec, srcs) })
	srcs.close()
	root.Close()
	trace.WithRegion(ctx, "fork: wait for the journal", func() { err = journal.wait(m, jobs) })
	if err != nil {
		return nil, m.failBatch(ctx, jobs, err)
	}
	errs := make([]error, len(jobs))
	eachFork(len(jobs), forkBatchWorkers, func(i int) { errs[i] = m.forkJournalled(ctx, jobs[i], built[i]) })
	if err := errors.Join(errs...); err != nil {
		return nil, m.failBatch(ctx, jobs, err)
	}
	// The last commit's statements run while the dirs are renamed and made
	// durable; it commits only on renameBatch's go-ahead (store.GroupAfter),
	// so no fork is complete before its dir is durable under its own name.
	// It is not synced: what it says, the reconciler can say again from
	// the first commit and the durable dirs (rollForwardBatches).
	recs := make([]store.Instance, len(jobs))
	err = m.commitAfter(ctx, "fork:batch-committing", func(tx *store.Tx) error {
		for i, job := range jobs {
			recs[i] = completed(job.rec, job.res)
			if err := finishForkUnit(job.o, recs[i])(tx); err != nil {
				return err
			}
		}
		return nil
	}, func() error { return m.renameBatch(ctx, jobs) })
	if err != nil {
		return nil, m.failBatch(ctx, jobs, err)
	}
	crashPoint("fork", "batch-committed") // test hook (crashhook.go)
	for i, job := range jobs {
		m.forked(job, recs[i], false)
	}
	return recs, nil
}

// renameBatch gives every fork of a journalled batch its own name, and one
// fsync of their parent makes every rename durable.
func (m *Manager) renameBatch(ctx context.Context, jobs []*forkJob) error {
	defer trace.StartRegion(ctx, "fork: rename").End()
	for i, job := range jobs {
		if err := os.Rename(job.tmp.Jail, job.final.Jail); err != nil {
			return err
		}
		if i == 0 {
			crashPoint("fork", "batch-renaming") // test hook: one dir under its own name, none durable
		}
	}
	if err := atomicfile.SyncDir(filepath.Dir(jobs[0].final.Jail)); err != nil {
		return err
	}
	if err := m.fault("fork:batch-renamed"); err != nil { // tests only: every dir under its own name
		return err
	}
	crashPoint("fork", "batch-files") // test hook: every fork's dir is durable, its record still Forking
	return nil
}

// batchJournal is a batch's first commit (beginBatch).
type batchJournal struct {
	done chan struct{}
	ids  []int64          // the forks' journal entries; read after done
	recs []store.Instance // their records as committed (a networked one with its slot)
	err  error            // set before done is closed
}

// wait waits for the commit and, once it is made, gives each job its
// journal entry and what the commit took (a networked fork's slot).
func (j *batchJournal) wait(m *Manager, jobs []*forkJob) error {
	<-j.done
	if j.err != nil {
		return j.err
	}
	for i, job := range jobs {
		job.o = &op{m: m, id: j.ids[i], kind: "fork", subject: job.id}
		job.rec.NetSlot, job.rec.NetWarm = j.recs[i].NetSlot, j.recs[i].NetWarm
	}
	return nil
}

// beginBatch starts a batch's first commit, synced, in the background: one
// unit with every fork's journal entry (begun, naming its batch) and
// Forking record (a networked one takes its slot), so a taken name or a
// full pool writes nothing. The records are copied before it returns: the
// jobs' builds go on changing theirs.
func (m *Manager) beginBatch(ctx context.Context, jobs []*forkJob) *batchJournal {
	j := &batchJournal{done: make(chan struct{}), ids: make([]int64, len(jobs)), recs: make([]store.Instance, len(jobs))}
	pubs := make([][]store.Publish, len(jobs))
	for i, job := range jobs {
		j.recs[i], pubs[i] = job.rec, job.pubs
	}
	go func() {
		defer close(j.done)
		batch := opPayload{Source: j.recs[0].Source, Batch: j.recs[0].ID, BatchSize: len(j.recs)}
		err := m.db.Group(ctx, "fork:beginning", func(tx *store.Tx) error {
			for i := range j.recs {
				var err error
				if j.ids[i], err = tx.Begin("fork", j.recs[i].ID, batch); err != nil {
					return err
				}
				if j.recs[i].Networked {
					err = tx.CreateNetworkedInstance(&j.recs[i], m.net().Config().Slots(), pubs[i])
				} else {
					err = tx.CreateInstance(j.recs[i])
				}
				if err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			j.err = networkRecordErr(m.net(), err)
			return
		}
		crashPoint("fork", "begun") // test hook (crashhook.go)
	}()
	return j
}

// failBatch removes every fork of a batch and journals err as each one's
// outcome (undoFork), and returns err with any removal that failed.
func (m *Manager) failBatch(ctx context.Context, jobs []*forkJob, err error) error {
	err = apiErr(fmt.Errorf("a batch of %d forks of %s: %w (no fork of the batch kept)", len(jobs), jobs[0].rec.Source, err))
	out := []error{err}
	for _, job := range jobs {
		if uerr := m.undoFork(ctx, job, err); uerr != err {
			out = append(out, uerr) // err with a removal that failed joined to it
		}
	}
	return errors.Join(out...)
}

// expectedForkMode is the fork_mode spec's forks get by the fork strategy:
// "" for a fork without memory. (A hardlink the filesystem refuses falls
// back to a clone; forkModeOf tells that afterwards.)
func (m *Manager) expectedForkMode(spec forkSpec) memfile.Mode {
	switch {
	case spec.files.from == nil:
		return ""
	case m.cfg.ForkStrategy == ForkStrategyReflink:
		return memfile.ModeReflink
	case m.cfg.ForkStrategy == ForkStrategyCopy:
		return memfile.ModeCopy
	}
	return memfile.ModeHardlink
}

// rollForwardBatches completes every fork batch a crash or a power cut
// interrupted after its renames were durable: its last commit lost, every
// fork of it has its entry open (the first commit, synced, made them all)
// and its Forking record, and its directory under its own name. Such a
// batch is completed in one commit, every record Standby (or Stopped,
// without memory) with the fork_mode its mem-file shows, and every entry
// finished; the caller then reads the open entries again. A batch with
// any fork missing (an entry, a record still Forking, a directory under
// its own name, its mem-file) is left to reconcileEntry, which removes
// each of its forks: never part of a batch. It returns how many batches it
// completed.
func (m *Manager) rollForwardBatches(ctx context.Context, entries []store.Entry) (int, error) {
	if os.Getenv(UnsafeNoForkRollForwardEnv) == "1" { // a twin test only (crashhook.go)
		return 0, nil
	}
	batches := map[string][]store.Entry{}
	sizes := map[string]int{}
	var keys []string
	for _, e := range entries {
		var p opPayload
		if e.Kind != "fork" || json.Unmarshal(e.Payload, &p) != nil || p.Batch == "" {
			continue
		}
		if _, ok := batches[p.Batch]; !ok {
			keys = append(keys, p.Batch)
		}
		batches[p.Batch] = append(batches[p.Batch], e)
		sizes[p.Batch] = p.BatchSize
	}
	done := 0
	for _, key := range keys {
		members := batches[key]
		recs, why := m.wholeBatch(ctx, members, sizes[key])
		if why != "" {
			m.log.Info("reconcile: a fork batch interrupted before it was whole: its forks are removed", "batch", key, "forks", sizes[key], "why", why)
			continue
		}
		outcome := fmt.Sprintf("reconciled: completed with the %d forks of its batch (every dir was in place; the batch's last commit was lost)", len(recs))
		err := m.db.Group(ctx, "fork:batch-committing", func(tx *store.Tx) error {
			for i, e := range members {
				if err := tx.UpdateInstance(recs[i]); err != nil {
					return err
				}
				if err := tx.Finish(e.ID, outcome); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return done, fmt.Errorf("reconcile: complete the fork batch %s: %w", key, err)
		}
		m.log.Info("reconcile: completed a fork batch whose last commit was lost", "batch", key, "forks", len(recs))
		done++
	}
	return done, nil
}

// wholeBatch returns the finished records of a batch's forks (members, of
// a batch of size) if every one of them is whole, else why not.
func (m *Manager) wholeBatch(ctx context.Context, members []store.Entry, size int) ([]store.Instance, string) {
	if len(members) != size {
		return nil, fmt.Sprintf("%d of its %d forks have an open entry", len(members), size)
	}
	recs := make([]store.Instance, len(members))
	for i, e := range members {
		in, err := m.db.GetInstance(ctx, e.Subject)
		if err != nil || in.State != api.StateForking {
			return nil, fmt.Sprintf("fork %s has no Forking record (%v)", e.Subject, err)
		}
		g, err := m.guest(in.ID)
		if err != nil {
			return nil, err.Error()
		}
		if st, err := os.Lstat(g.Jail); err != nil || !st.IsDir() {
			return nil, fmt.Sprintf("fork %s has no directory under its own name", in.ID)
		}
		mode := memfile.Mode(in.ForkMode)
		if mode != "" {
			if mode, err = m.forkModeOf(g.Latest().Memory(), mode); err != nil {
				return nil, fmt.Sprintf("fork %s: %v", in.ID, err)
			}
		}
		in.ForkMode = string(mode)
		recs[i] = completed(in, memfile.ShareResult{Mode: mode})
	}
	return recs, ""
}

// forkModeOf is the fork_mode of a fork's mem-file mem made by the
// strategy that expects want: a hardlink still shares its inode; a
// hardlink the filesystem refused became a clone (a reflink where the
// filesystem has them).
func (m *Manager) forkModeOf(mem string, want memfile.Mode) (memfile.Mode, error) {
	st, err := os.Lstat(mem)
	if err != nil {
		return "", err
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("%s is not a regular file", mem)
	}
	if want != memfile.ModeHardlink {
		return want, nil
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Nlink > 1 {
		return memfile.ModeHardlink, nil
	}
	if m.fs.reflink {
		return memfile.ModeReflink, nil
	}
	return memfile.ModeCopy, nil
}
