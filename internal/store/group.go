package store

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"runtime/trace"
	"sync"
	"sync/atomic"
	"time"
)

// Group commit. With synchronous=FULL every commit costs an fsync of the
// WAL, and through one connection commits queue behind each other: 25
// concurrent forks writing 3 commits each would wait for 75 fsyncs in a row.
// Group lets concurrent writers share commits instead: a unit of writes
// handed to Group waits, with whatever other units arrive meanwhile, for the
// next group; the committer runs the whole group as one transaction with one
// fsync. A single writer still commits at once (no batching delay is added:
// a group is whatever queued while the previous one was being made durable).
//
// Each unit runs in a savepoint of its own, so a unit's error (a taken name,
// say) rolls back that unit's statements only and is returned to its caller
// alone; the group commits the rest. A group is all or nothing on disk: a
// crash or power cut before its commit loses every unit of it, after it
// keeps every one; a unit is never half committed.

// execer is what a statement runs on: the database (a commit per statement)
// or a group's transaction.
type execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// ErrClosed is returned by Group once the store is closing.
var ErrClosed = errors.New("store closed")

// Options are Open's optional settings.
type Options struct {
	// BeforeCommit, when set, is called by the committer with the labels of
	// a group's units (those whose writes succeeded) after their statements
	// ran and before the group's COMMIT: a crash test kills the process
	// there to show a group is lost whole.
	BeforeCommit func(labels []string)
	// MinGroup, when above 1, holds a group until that many units are
	// queued or MinGroupWait (default 10 s) has passed since its first unit:
	// tests use it to put a known number of writers in one group. Never set
	// it in production; it adds latency.
	MinGroup     int
	MinGroupWait time.Duration
}

// Tx is one unit of a group commit, as fn of Group sees it: its writes run
// in the group's transaction. Methods take no context: a unit runs to its
// end once the committer starts it.
type Tx struct {
	ctx context.Context
	w   writer // the group's transaction
	// changes are the unit's record writes, reported to the store's
	// observer once the group has committed (observe.go).
	changes []Change
}

// Begin is Store.Begin inside the group.
func (t *Tx) Begin(kind, subject string, payload any) (int64, error) {
	return begin(t.ctx, t.w, kind, subject, payload)
}

// Step is Store.Step inside the group.
func (t *Tx) Step(id int64, step string, payload any) error {
	return stepEntry(t.ctx, t.w, id, step, payload)
}

// Finish is Store.Finish inside the group.
func (t *Tx) Finish(id int64, outcome string) error { return finishEntry(t.ctx, t.w, id, outcome) }

// CreateInstance is Store.CreateInstance inside the group.
func (t *Tx) CreateInstance(in Instance) error {
	return t.changed(createInstance(t.ctx, t.w, in), Created, in)
}

// UpdateInstance is Store.UpdateInstance inside the group.
func (t *Tx) UpdateInstance(in Instance) error {
	return t.changed(updateInstance(t.ctx, t.w, in), Updated, in)
}

// DeleteInstance is Store.DeleteInstance inside the group.
func (t *Tx) DeleteInstance(id string) error {
	return t.changed(deleteInstance(t.ctx, t.w, id), Deleted, Instance{ID: id})
}

// changed records a successful instance write for the observer.
func (t *Tx) changed(err error, op ChangeOp, in Instance) error {
	if err == nil {
		t.changes = append(t.changes, Change{Op: op, Instance: &in})
	}
	return err
}

// unit is one Group call waiting for its group.
type unit struct {
	ctx      context.Context
	label    string
	fn       func(*Tx) error
	unsynced bool         // GroupUnsynced: need not wait for the fsync
	ready    <-chan error // GroupAfter: its go-ahead, awaited before the COMMIT
	done     chan error   // buffered: the committer never blocks on a caller
	changes  []Change     // its record writes, once it has run without error
}

// groupQueue is the committer's input.
type groupQueue struct {
	mu      sync.Mutex
	pending []*unit // guarded by mu
	closed  bool    // guarded by mu: no unit is accepted once set
	wake    chan struct{}
	stopped chan struct{} // closed when the committer has returned

	groups, units atomic.Uint64 // counters for metrics
}

// Group runs fn as one unit of the next group commit (see above) and returns
// once that group is durable (nil), or with fn's error (its writes rolled
// back), or with the commit's error (nothing of the group was written). fn
// runs on the committer while the group's transaction holds the connection:
// it must only issue writes through tx, never call the Store, and not block.
// label names the unit for Options.BeforeCommit. A unit whose ctx is done
// before the committer reaches it is dropped with ctx's error; once it has
// run, Group waits for the outcome whatever ctx does, so the caller always
// knows whether its writes are durable.
func (s *Store) Group(ctx context.Context, label string, fn func(tx *Tx) error) error {
	return s.enqueue(&unit{ctx: ctx, label: label, fn: fn, done: make(chan error, 1)})
}

// GroupUnsynced is Group for writes that need not be durable when it
// returns: they are committed, visible to every later read and ordered
// before every later commit, which makes them durable with itself (the WAL
// is sequential), but a power cut before that may lose them. A group made
// only of such units commits without fsyncing the WAL; a group holding any
// Group unit is synced as usual, and the database stays synchronous=FULL
// for everything else. Use it only for writes the caller can redo after a
// power cut from what is durable (the fork's last commit: see
// instance.rollForwardFork); never for a write that is the only record of
// something.
func (s *Store) GroupUnsynced(ctx context.Context, label string, fn func(tx *Tx) error) error {
	return s.enqueue(&unit{ctx: ctx, label: label, fn: fn, unsynced: true, done: make(chan error, 1)})
}

// After is GroupAfter's go-ahead: one value on Ready, nil to commit the
// unit, an error to roll it back. Unsynced is GroupUnsynced's: a fork's
// last (or one) commit and a fork batch's last commit set it, as their
// loss is repaired from what is durable.
type After struct {
	Ready    <-chan error
	Unsynced bool
}

// GroupAfter is Group for a unit whose statements may run before the caller
// is ready for them to be durable (a fork's or a fork batch's last commit,
// while its directories are made durable): the committer runs fn, then
// waits, the group's transaction open, for one value on a.Ready before the
// group's COMMIT. nil commits the unit with the group; an error rolls back the
// unit's writes alone (the rest of the group commits) and GroupAfter
// returns it. So nothing of the unit is durable, or even visible, before
// the go-ahead: the commit order the caller needs is kept.
//
// The committer holds the store's writer until the go-ahead (the units of
// the group after it run once it has come, and later groups wait: a fork's
// rename fsync, ~0.5 ms), so the caller must send it without waiting for
// any write of the store, or the two wait for each other forever; reads
// are free.
func (s *Store) GroupAfter(ctx context.Context, label string, a After, fn func(tx *Tx) error) error {
	return s.enqueue(&unit{ctx: ctx, label: label, fn: fn, unsynced: a.Unsynced, ready: a.Ready, done: make(chan error, 1)})
}

func (s *Store) enqueue(u *unit) error {
	label := u.label
	q := &s.group
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return fmt.Errorf("group commit %s: %w", label, ErrClosed)
	}
	q.pending = append(q.pending, u)
	select { // under mu: closeGroup closes wake under mu too
	case q.wake <- struct{}{}:
	default: // the committer is already woken
	}
	q.mu.Unlock()
	return <-u.done
}

// GroupCommits returns how many groups were committed and how many units
// they held, since Open.
func (s *Store) GroupCommits() (groups, units uint64) {
	return s.group.groups.Load(), s.group.units.Load()
}

// commitLoop is the committer goroutine: it takes what is pending, commits
// it as one group, and repeats until the store closes; units still pending
// then get ErrClosed.
func (s *Store) commitLoop() {
	q := &s.group
	defer close(q.stopped)
	for range q.wake {
		for {
			batch, closed := s.takeGroup()
			if len(batch) > 0 {
				s.commitGroup(batch)
			}
			if closed {
				s.failPending(ErrClosed)
				return
			}
			if len(batch) == 0 {
				break
			}
		}
	}
}

// takeGroup takes every pending unit (waiting for MinGroup of them when a
// test asks to) and reports whether the store is closing.
func (s *Store) takeGroup() ([]*unit, bool) {
	q := &s.group
	var deadline <-chan time.Time
	for {
		q.mu.Lock()
		n, closed := len(q.pending), q.closed
		if n == 0 || n >= s.opts.MinGroup || closed {
			batch := q.pending
			q.pending = nil
			q.mu.Unlock()
			return batch, closed
		}
		q.mu.Unlock()
		if deadline == nil {
			wait := s.opts.MinGroupWait
			if wait <= 0 {
				wait = 10 * time.Second
			}
			deadline = time.After(wait)
		}
		select {
		case <-q.wake:
		case <-deadline:
			q.mu.Lock()
			batch := q.pending
			q.pending = nil
			closed := q.closed
			q.mu.Unlock()
			return batch, closed
		}
	}
}

// commitGroup runs batch as one transaction, each unit in a savepoint, and
// tells every unit its outcome.
func (s *Store) commitGroup(batch []*unit) {
	ctx := context.Background()
	failAll := func(err error) {
		for _, u := range batch {
			u.done <- fmt.Errorf("group commit %s: %w", u.label, err)
		}
	}
	synced := false
	for _, u := range batch {
		synced = synced || !u.unsynced
	}
	conn, err := s.db.Conn(ctx)
	if err != nil {
		failAll(err)
		return
	}
	defer conn.Close()
	if !synced {
		// Only GroupUnsynced units: commit without fsyncing the WAL. The
		// connection is back to synchronous=FULL before anything else uses
		// it (restoreFull, deferred after conn.Close so it runs first).
		if _, err := conn.ExecContext(ctx, `PRAGMA synchronous=NORMAL`); err != nil {
			failAll(err)
			return
		}
		defer restoreFull(ctx, conn)
	}
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		failAll(fmt.Errorf("begin: %w", err))
		return
	}
	// A panic in a unit or the hook must crash the daemon (its journal
	// recovers), not hang it: the connection cannot be restored or closed
	// while this transaction holds it, so it is rolled back first (a no-op
	// once committed or rolled back).
	defer tx.Rollback()
	var ok []*unit
	var labels []string
	for i, u := range batch {
		if err := u.ctx.Err(); err != nil {
			u.done <- fmt.Errorf("group commit %s: %w", u.label, err)
			continue
		}
		if err := runUnit(ctx, writer{s: s, tx: tx}, u); err != nil {
			if errors.Is(err, errSavepoint) {
				// The transaction itself is unusable: nothing of the group
				// can be committed.
				tx.Rollback()
				for _, v := range append(ok, batch[i:]...) {
					v.done <- fmt.Errorf("group commit %s: %w", v.label, err)
				}
				return
			}
			u.done <- err
			continue
		}
		ok = append(ok, u)
		labels = append(labels, u.label)
	}
	if len(ok) == 0 {
		tx.Rollback()
		return
	}
	if s.opts.BeforeCommit != nil {
		s.opts.BeforeCommit(labels)
	}
	// A region for forkd serve --profile: a commit's fsync is where a
	// group's time goes.
	trace.WithRegion(ctx, "store: commit a group", func() { err = tx.Commit() })
	if err == nil {
		s.group.groups.Add(1)
		s.group.units.Add(uint64(len(ok)))
		for _, u := range ok { // committed: in order, before any caller returns
			for _, c := range u.changes {
				s.notify(c)
			}
		}
	}
	for _, u := range ok {
		if err != nil {
			u.done <- fmt.Errorf("group commit %s: commit: %w", u.label, err)
		} else {
			u.done <- nil
		}
	}
}

// restoreFull puts the connection back to synchronous=FULL after an
// unsynced group. A connection that cannot be is discarded: database/sql
// then opens a new one, which the DSN makes FULL.
func restoreFull(ctx context.Context, conn *sql.Conn) {
	var v int
	_, err := conn.ExecContext(ctx, `PRAGMA synchronous=FULL`)
	if err == nil {
		err = conn.QueryRowContext(ctx, `PRAGMA synchronous`).Scan(&v)
	}
	if err != nil || v != 2 {
		conn.Raw(func(any) error { return driver.ErrBadConn })
	}
}

// errSavepoint marks a failure of the savepoint statements themselves.
var errSavepoint = errors.New("savepoint")

// runUnit runs one unit in its own savepoint: on fn's error its statements
// are rolled back and the transaction goes on.
func runUnit(ctx context.Context, w writer, u *unit) error {
	tx := w.tx
	if _, err := tx.ExecContext(ctx, `SAVEPOINT unit`); err != nil {
		return fmt.Errorf("%w: %v", errSavepoint, err)
	}
	t := &Tx{ctx: ctx, w: w}
	ferr := u.fn(t)
	if ferr == nil && u.ready != nil { // GroupAfter
		trace.WithRegion(ctx, "store: wait for a unit's go-ahead", func() { ferr = <-u.ready })
	}
	if ferr != nil {
		if _, err := tx.ExecContext(ctx, `ROLLBACK TO unit`); err != nil {
			return fmt.Errorf("%w: rollback to: %v (after %v)", errSavepoint, err, ferr)
		}
		if _, err := tx.ExecContext(ctx, `RELEASE unit`); err != nil {
			return fmt.Errorf("%w: release: %v (after %v)", errSavepoint, err, ferr)
		}
		return ferr
	}
	if _, err := tx.ExecContext(ctx, `RELEASE unit`); err != nil {
		return fmt.Errorf("%w: release: %v", errSavepoint, err)
	}
	u.changes = t.changes
	return nil
}

// failPending answers every unit still queued with err.
func (s *Store) failPending(err error) {
	q := &s.group
	q.mu.Lock()
	batch := q.pending
	q.pending = nil
	q.mu.Unlock()
	for _, u := range batch {
		u.done <- fmt.Errorf("group commit %s: %w", u.label, err)
	}
}

// closeGroup stops the committer after the group it is making, if any.
func (s *Store) closeGroup() {
	q := &s.group
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		<-q.stopped
		return
	}
	q.closed = true
	close(q.wake)
	q.mu.Unlock()
	<-q.stopped
}
