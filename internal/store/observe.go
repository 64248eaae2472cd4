package store

// ChangeOp says what happened to a record.
type ChangeOp string

const (
	Created ChangeOp = "created"
	Updated ChangeOp = "updated"
	Deleted ChangeOp = "deleted"
)

// Change is one committed write of an instance or snapshot record, as an
// Observe function sees it: exactly one of Instance and Snapshot is set
// (for a Deleted change only its ID is meaningful).
type Change struct {
	Op       ChangeOp
	Instance *Instance
	Snapshot *Snapshot
}

// Observe has f told of every instance and snapshot write once it is
// committed, in commit order: a statement's own commit, or a group's (a
// unit whose function failed reports nothing). f runs on the writer's
// goroutine (the group committer's for a group) and must not block or call
// the Store. Writes committed before Observe are not reported.
func (s *Store) Observe(f func(Change)) { s.observer.Store(&f) }

func (s *Store) notify(c Change) {
	if unsafeCacheSkips == nil || !unsafeCacheSkips(c) { // the hook: a twin test only
		s.cache.apply(c)
	}
	if f := s.observer.Load(); f != nil {
		(*f)(c)
	}
}

func (s *Store) instanceChanged(op ChangeOp, in Instance) {
	s.notify(Change{Op: op, Instance: &in})
}

func (s *Store) snapshotChanged(op ChangeOp, sn Snapshot) {
	s.notify(Change{Op: op, Snapshot: &sn})
}

// unsafeCacheSkips, when a test sets it, keeps the changes it returns true
// for out of the cache, as a write path that forgot the cache would. It
// exists only so the cache's test can show it catches such a path.
var unsafeCacheSkips func(Change) bool
