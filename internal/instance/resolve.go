package instance

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/store"
)

// namePattern is what instance and snapshot names look like.
var namePattern = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`) })

// validName checks a name a client gave. A name with the shape of an id (24
// hex digits) is refused: it would shadow the instance or snapshot whose id
// it is (`forkd rm <that id>` removed another, running, VM).
func validName(kind, name string) error {
	if !namePattern().MatchString(name) {
		return fmt.Errorf("%w: %s name %q: want 1-63 of [A-Za-z0-9._-], starting with a letter or digit", api.ErrInvalid, kind, name)
	}
	if guestdir.IsForkdID(strings.ToLower(name)) {
		return fmt.Errorf("%w: %s name %q has the shape of an id (24 hex digits) and could shadow one; pick another name", api.ErrInvalid, kind, name)
	}
	return nil
}

// minPrefix is the shortest id prefix a reference may be: a one- or
// two-character prefix matches a good share of the VMs on a busy host, and a
// mistyped name would silently pick one of them.
const minPrefix = 6

// destructive reports whether op destroys state a guess must never pick:
// deleting an instance or snapshot, or stopping a VM (its memory is dropped).
// Such operations resolve only an exact name or full id.
func destructive(op string) bool { return op == "delete" || op == "stop" }

// resolve picks the one item ref names among cands (the items whose name is
// ref or whose id starts with ref): its exact name or its exact id; else,
// unless op is destructive, the only id that starts with ref, when ref has at
// least minPrefix characters. A ref that is one item's name and another's id
// or id prefix is ambiguous, and the error names both (names cannot have an
// id's shape, so this takes a prefix, or a name made before that rule).
func resolve[T any](ref, kind, op string, cands []T, id, name func(T) string) (T, error) {
	var zero T
	if ref == "" {
		return zero, fmt.Errorf("%w: empty %s reference", api.ErrInvalid, kind)
	}
	describe := func(it T) string { return fmt.Sprintf("%s %s (%q)", kind, id(it), name(it)) }
	var byName, byID *T
	var byPrefix []T
	for i, it := range cands {
		switch {
		case name(it) == ref:
			byName = &cands[i]
		case id(it) == ref:
			byID = &cands[i]
		case strings.HasPrefix(id(it), ref) && len(ref) >= minPrefix:
			byPrefix = append(byPrefix, it)
		}
	}
	if byName != nil {
		// A name shadowing another item's id (or prefix) would let a
		// command meant for one act on the other: say so, never pick.
		if byID != nil {
			return zero, fmt.Errorf("%w: %q is the name of %s and the id of %s; use the full id of the one you mean",
				api.ErrAmbiguous, ref, describe(*byName), describe(*byID))
		}
		if len(byPrefix) > 0 {
			return zero, fmt.Errorf("%w: %q is the name of %s and an id prefix of %s; use the full id of the one you mean",
				api.ErrAmbiguous, ref, describe(*byName), describe(byPrefix[0]))
		}
		return *byName, nil
	}
	if byID != nil {
		return *byID, nil
	}
	switch {
	case len(byPrefix) == 0 && len(ref) < minPrefix && anyPrefix(ref, cands, id):
		return zero, fmt.Errorf("%w: no %s named %q (an id prefix needs at least %d characters)", api.ErrNotFound, kind, ref, minPrefix)
	case len(byPrefix) == 0:
		return zero, fmt.Errorf("%w: %s %q", api.ErrNotFound, kind, ref)
	case len(byPrefix) > 1:
		return zero, fmt.Errorf("%w: %s reference %q is a prefix of %d ids (%s, %s...); give more characters or the name",
			api.ErrAmbiguous, kind, ref, len(byPrefix), describe(byPrefix[0]), describe(byPrefix[1]))
	case destructive(op):
		return zero, fmt.Errorf("%w: %q is only a prefix of the id of %s; %s needs the exact name or the full id, never a prefix",
			api.ErrAmbiguous, ref, describe(byPrefix[0]), op)
	}
	return byPrefix[0], nil
}

func anyPrefix[T any](ref string, cands []T, id func(T) string) bool {
	for _, it := range cands {
		if strings.HasPrefix(id(it), ref) {
			return true
		}
	}
	return false
}

// resolveInstance finds the instance ref names for a non-destructive
// operation (a unique id prefix will do).
func (m *Manager) resolveInstance(ctx context.Context, ref string) (store.Instance, error) {
	return m.resolveInstanceFor(ctx, ref, "")
}

// resolveInstanceFor finds the instance ref names for op (see resolve).
func (m *Manager) resolveInstanceFor(ctx context.Context, ref, op string) (store.Instance, error) {
	all, err := m.db.InstancesMatching(ctx, ref)
	if err != nil {
		return store.Instance{}, err
	}
	cands := all[:0]
	for _, in := range all {
		if in.State != stateCreating { // not visible until its create finished
			cands = append(cands, in)
		}
	}
	return resolve(ref, "instance", op, cands,
		func(i store.Instance) string { return i.ID }, func(i store.Instance) string { return i.Name })
}

// resolveSnapshotFor finds the snapshot ref names for op (see resolve).
func (m *Manager) resolveSnapshotFor(ctx context.Context, ref, op string) (store.Snapshot, error) {
	cands, err := m.db.SnapshotsMatching(ctx, ref)
	if err != nil {
		return store.Snapshot{}, err
	}
	return resolve(ref, "snapshot", op, cands,
		func(s store.Snapshot) string { return s.ID }, func(s store.Snapshot) string { return s.Name })
}

func (m *Manager) resolveSnapshot(ctx context.Context, ref string) (store.Snapshot, error) {
	return m.resolveSnapshotFor(ctx, ref, "")
}

// lockInstance resolves ref, takes the instance's lock (write or read) and
// re-reads the record under it: the state seen before the lock may have
// changed while waiting. The returned unlock releases the lock.
func (m *Manager) lockInstance(ctx context.Context, ref string, write bool) (store.Instance, func(), error) {
	in, err := m.resolveInstance(ctx, ref)
	if err != nil {
		return store.Instance{}, nil, err
	}
	return m.lockResolved(ctx, in, write)
}

// lockResolved is lockInstance for an instance its caller has resolved
// already (to decide how to lock it): one lookup of its id under the lock,
// not a second resolve before it. A fork, a snapshot and a delete each
// resolve first, and every read costs CPU a burst of them shares.
func (m *Manager) lockResolved(ctx context.Context, in store.Instance, write bool) (store.Instance, func(), error) {
	l := m.instanceLock(in.ID)
	unlock := rwLock(l, write)
	id := in.ID
	in, err := m.db.GetInstance(ctx, id)
	if err != nil {
		unlock()
		if errors.Is(err, store.ErrNotFound) {
			dropLock(m, m.instLocks, id, l)
		}
		return store.Instance{}, nil, apiErr(err)
	}
	if write {
		m.settleNoticed(ctx, &in)
	}
	return in, unlock, nil
}

// lockSnapshot takes snapshot id's lock (write or read) and re-reads its
// record under it, as lockResolved does for an instance; the returned
// unlock releases the lock. A snapshot deleted since its caller resolved
// it leaves no lock behind: the store's error (not found) is returned as
// is, for the caller to word.
func (m *Manager) lockSnapshot(ctx context.Context, id string, write bool) (store.Snapshot, func(), error) {
	l := m.snapshotLock(id)
	unlock := rwLock(&l.rw, write)
	sn, err := m.db.GetSnapshot(ctx, id)
	if err != nil {
		unlock()
		if errors.Is(err, store.ErrNotFound) {
			dropLock(m, m.snapLocks, id, l)
		}
		return store.Snapshot{}, nil, err
	}
	return sn, unlock, nil
}

// rwLock takes l for writing or for reading and returns how to release it.
func rwLock(l *sync.RWMutex, write bool) (unlock func()) {
	if write {
		l.Lock()
		return l.Unlock
	}
	l.RLock()
	return l.RUnlock
}

// dropLock removes id's entry from locks (a map under m.mu) if it is
// still l. A locker that finds its instance or snapshot deleted calls it:
// the delete may have dropped the lock it knew before this one was made,
// and nothing else would drop this one. Whoever else holds or waits on l
// finds the record gone too (forget's rule).
func dropLock[L any](m *Manager, locks map[string]*L, id string, l *L) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if locks[id] == l {
		delete(locks, id)
	}
}

func invalidState(in store.Instance, action string, want ...string) error {
	return fmt.Errorf("%w: cannot %s instance %q: it is %s (needs %s)", api.ErrInvalidState, action, in.Name, in.State, strings.Join(want, " or "))
}

func oneOf(s string, set ...string) bool {
	for _, x := range set {
		if s == x {
			return true
		}
	}
	return false
}
