package instance

import (
	"context"
	"fmt"
	"regexp"
	"strings"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/store"
)

// namePattern is what instance and snapshot names look like.
var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

func validName(kind, name string) error {
	if !namePattern.MatchString(name) {
		return fmt.Errorf("%w: %s name %q: want 1-63 of [A-Za-z0-9._-], starting with a letter or digit", api.ErrInvalid, kind, name)
	}
	return nil
}

// resolve picks the one item a ref names: exact id, then exact name, then a
// unique id prefix (DESIGN.md §5).
func resolve[T any](ref, kind string, items []T, id, name func(T) string) (T, error) {
	var zero T
	if ref == "" {
		return zero, fmt.Errorf("%w: empty %s reference", api.ErrInvalid, kind)
	}
	for _, it := range items {
		if id(it) == ref {
			return it, nil
		}
	}
	for _, it := range items {
		if name(it) == ref {
			return it, nil
		}
	}
	var hits []T
	for _, it := range items {
		if strings.HasPrefix(id(it), ref) {
			hits = append(hits, it)
		}
	}
	switch len(hits) {
	case 0:
		return zero, fmt.Errorf("%w: %s %q", api.ErrNotFound, kind, ref)
	case 1:
		return hits[0], nil
	}
	return zero, fmt.Errorf("%w: %s %q matches %d ids; use more characters", api.ErrAmbiguous, kind, ref, len(hits))
}

func (m *Manager) resolveInstance(ctx context.Context, ref string) (store.Instance, error) {
	if in, err := m.db.GetInstance(ctx, ref); err == nil {
		return in, nil
	}
	all, err := m.db.ListInstances(ctx)
	if err != nil {
		return store.Instance{}, err
	}
	return resolve(ref, "instance", all,
		func(i store.Instance) string { return i.ID }, func(i store.Instance) string { return i.Name })
}

func (m *Manager) resolveSnapshot(ctx context.Context, ref string) (store.Snapshot, error) {
	if sn, err := m.db.GetSnapshot(ctx, ref); err == nil {
		return sn, nil
	}
	all, err := m.db.ListSnapshots(ctx)
	if err != nil {
		return store.Snapshot{}, err
	}
	return resolve(ref, "snapshot", all,
		func(s store.Snapshot) string { return s.ID }, func(s store.Snapshot) string { return s.Name })
}

// lockInstance resolves ref, takes the instance's lock (write or read) and
// re-reads the record under it: the state seen before the lock may have
// changed while waiting. The returned unlock releases the lock.
func (m *Manager) lockInstance(ctx context.Context, ref string, write bool) (store.Instance, func(), error) {
	in, err := m.resolveInstance(ctx, ref)
	if err != nil {
		return store.Instance{}, nil, err
	}
	l := m.instanceLock(in.ID)
	unlock := l.Unlock
	if write {
		l.Lock()
	} else {
		l.RLock()
		unlock = l.RUnlock
	}
	in, err = m.db.GetInstance(ctx, in.ID)
	if err != nil {
		unlock()
		return store.Instance{}, nil, apiErr(err)
	}
	if write {
		m.settleIfVMMDied(ctx, &in)
	}
	return in, unlock, nil
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
