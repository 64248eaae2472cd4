package instance

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime/trace"
	"sync"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/atomicfile"
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
	recs, err := m.forkBatch(ctx, a.ids, req.Names(), a.tmpl, a.spec)
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

// forkBatch makes a fork of spec (not a live one) for each of ids, named
// names, with fork's steps taken for every fork of the batch before the
// next: one synced commit journals every fork (beginBatch) while every
// directory is built, then every directory is renamed into place and one
// fsync of their parent makes all of them durable, and one last commit,
// synced, completes them all (its statements run during the renames, its
// COMMIT only after that fsync).
//
// The batch is all or none, across a crash or a power cut too. Its forks'
// journal entries do not roll forward (opPayload.RollForward is false, and
// their directories carry no record to restore them from): until the last
// commit is durable, the reconciler removes every fork of the batch whose
// entry it finds, and the first commit, durable before any directory takes
// its own name, names every one; once the last commit is durable all of
// them are complete, and it is one unit holding every fork.
func (m *Manager) forkBatch(ctx context.Context, ids, names []string, tmpl store.Instance, spec forkSpec) ([]store.Instance, error) {
	if spec.live != nil {
		return nil, fmt.Errorf("%w: a running source is forked live one fork at a time, not in a batch", api.ErrInvalid)
	}
	jobs := make([]*forkJob, len(ids))
	for i, id := range ids {
		job, err := m.newForkJob(id, names[i], nil, tmpl)
		if err != nil {
			return nil, err
		}
		job.batch = true
		jobs[i] = job
	}
	// The batch's first commit, made while its dirs are built: a fork of
	// a batch never rolls forward, so its Forking record need not hold
	// what building learns (its fork_mode): the last commit writes it.
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
	recs := make([]store.Instance, len(jobs))
	ready, committed := make(chan error, 1), make(chan error, 1)
	go func() {
		after := store.After{Ready: ready, Unsynced: os.Getenv(UnsafeUnsyncedBatchCommitEnv) == "1"} // a twin test only (crashhook.go)
		committed <- m.db.GroupAfter(ctx, "fork:batch-committing", after, func(tx *store.Tx) error {
			for i, job := range jobs {
				recs[i] = completed(job.rec, job.res)
				if err := finishForkUnit(job.o, recs[i])(tx); err != nil {
					return err
				}
			}
			return nil
		})
	}()
	err = m.renameBatch(ctx, jobs)
	ready <- err // no store write before it: the committer waits for it
	trace.WithRegion(ctx, "fork: last commit", func() {
		if cerr := <-committed; err == nil {
			err = cerr
		}
	})
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
	for _, job := range jobs {
		if err := os.Rename(job.tmp.Jail, job.final.Jail); err != nil {
			return err
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
// unit with every fork's journal entry (begun, not rolling forward) and
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
		err := m.db.Group(ctx, "fork:beginning", func(tx *store.Tx) error {
			for i := range j.recs {
				var err error
				if j.ids[i], err = tx.Begin("fork", j.recs[i].ID, opPayload{Source: j.recs[i].Source}); err != nil {
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
