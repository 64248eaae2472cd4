package store

import (
	"cmp"
	"context"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
)

// recordCache is every instance and snapshot record as last committed, in
// memory, so the reads every operation starts with (its reference
// resolved, its record read again under its lock: InstancesMatching,
// GetInstance, SnapshotsMatching, GetSnapshot) run no SQLite query. A
// query costs ~20-40 µs of CPU here, more when it is the first after a
// write (SQLite drops a reader's page cache whenever another connection
// wrote), and a fork makes two of them.
//
// Invariant: the cache holds what the database holds, as a read of it
// returns it. It is loaded at open, after the migrations, and every write
// of a record updates it (apply, from notify) once committed and before the
// write returns: a statement's own write once executed, a group's writes
// once its COMMIT is made, in commit order, a failed unit's never. So a
// read that starts after a write has returned sees it, as a read of the
// database would. The manager writes a record under that record's lock, so
// one record's changes reach the cache in the order they were committed
// (two writes under a read lock write the same value); a name freed by one
// record and taken by another may arrive in either order, which apply
// allows for. Nothing else writes the database while the store is open
// (the daemon holds the data dir).
type recordCache struct {
	mu     sync.RWMutex
	loaded bool              // guarded by mu
	insts  records[Instance] // guarded by mu
	snaps  records[Snapshot] // guarded by mu
}

// load fills c from the database (at open, before any write).
func (c *recordCache) load(ctx context.Context, s *Store) error {
	insts, err := s.ListInstances(ctx)
	if err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	snaps, err := s.ListSnapshots(ctx)
	if err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.insts.fill(insts, instanceKey)
	c.snaps.fill(snaps, snapshotKey)
	c.loaded = true
	return nil
}

// apply records one committed write. A record is kept as a read of the
// database would return it (asStored), not as its writer passed it.
func (c *recordCache) apply(ch Change) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case !c.loaded: // a write before load (the migrations')
	case ch.Instance != nil && ch.Op == Deleted:
		c.insts.remove(ch.Instance.ID)
	case ch.Instance != nil:
		c.insts.put(ch.Instance.asStored())
	case ch.Snapshot != nil && ch.Op == Deleted:
		c.snaps.remove(ch.Snapshot.ID)
	case ch.Snapshot != nil:
		c.snaps.put(ch.Snapshot.asStored())
	}
}

func (c *recordCache) instance(id string) (Instance, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	in, ok := c.insts.byID[id]
	return in, ok
}

func (c *recordCache) snapshot(id string) (Snapshot, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	sn, ok := c.snaps.byID[id]
	return sn, ok
}

func (c *recordCache) instancesMatching(ref string) []Instance {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.insts.matching(ref)
}

func (c *recordCache) snapshotsMatching(ref string) []Snapshot {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.snaps.matching(ref)
}

// recordKey is what the cache needs of a record: its id, its name and its
// created_at (refMatch's order).
type recordKey struct {
	id, name string
	created  int64
}

func instanceKey(in Instance) recordKey { return recordKey{in.ID, in.Name, in.CreatedAt.UnixNano()} }
func snapshotKey(sn Snapshot) recordKey { return recordKey{sn.ID, sn.Name, sn.CreatedAt.UnixNano()} }

// records is one kind of record, by id, with its names (a name to its
// id's record). Names are unique, but a name one record frees and another
// takes may reach the cache in either order: a name is dropped only while
// it is still the dropped record's.
type records[R any] struct {
	byID  map[string]R
	names map[string]string
	key   func(R) recordKey
}

func (t *records[R]) fill(all []R, key func(R) recordKey) {
	t.byID, t.names, t.key = make(map[string]R, len(all)), make(map[string]string, len(all)), key
	for _, r := range all {
		t.put(r)
	}
}

func (t *records[R]) put(r R) {
	k := t.key(r)
	t.remove(k.id) // its old name, if it was renamed
	t.byID[k.id], t.names[k.name] = r, k.id
}

func (t *records[R]) remove(id string) {
	old, ok := t.byID[id]
	if !ok {
		return
	}
	if name := t.key(old).name; t.names[name] == id {
		delete(t.names, name)
	}
	delete(t.byID, id)
}

// matching is refMatch over t: the record named ref and every one whose id
// is in [ref, idPrefixEnd(ref)), oldest first. It reads only the keys of
// the records it does not return: a record is hundreds of bytes.
func (t *records[R]) matching(ref string) []R {
	var out []R
	named, ok := t.names[ref]
	if ok {
		out = append(out, t.byID[named])
	}
	end := idPrefixEnd(ref)
	for id := range t.byID {
		if id >= ref && id < end && (!ok || id != named) {
			out = append(out, t.byID[id])
		}
	}
	slices.SortFunc(out, func(a, b R) int {
		ka, kb := t.key(a), t.key(b)
		return cmp.Or(cmp.Compare(ka.created, kb.created), strings.Compare(ka.id, kb.id))
	})
	return out
}

// asStored is in as a read of the database returns it once written: its
// columns (args) scanned back as the reads scan them (scanInstance).
func (in *Instance) asStored() Instance {
	out, err := scanInstance(argsRow(in.args()))
	if err != nil {
		panic(fmt.Sprintf("store: instance %s as stored: %v", in.ID, err)) // the columns and the scan disagree: a bug here
	}
	return out
}

// asStored is Instance.asStored for a snapshot.
func (sn *Snapshot) asStored() Snapshot {
	out, err := scanSnapshot(argsRow(sn.args()))
	if err != nil {
		panic(fmt.Sprintf("store: snapshot %s as stored: %v", sn.ID, err))
	}
	return out
}

// argsRow is a row whose columns are a write's arguments, for a scan
// function to read back.
type argsRow []any

func (r argsRow) Scan(dest ...any) error {
	if len(dest) != len(r) {
		return fmt.Errorf("%d columns, %d destinations", len(r), len(dest))
	}
	for i, d := range dest {
		dv := reflect.ValueOf(d).Elem()
		v := reflect.ValueOf(r[i])
		if !v.Type().ConvertibleTo(dv.Type()) || (v.Kind() == reflect.String) != (dv.Kind() == reflect.String) {
			return fmt.Errorf("column %d: %s into %s", i, v.Type(), dv.Type())
		}
		dv.Set(v.Convert(dv.Type()))
	}
	return nil
}
