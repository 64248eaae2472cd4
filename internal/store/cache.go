package store

import (
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
	mu        sync.RWMutex
	insts     map[string]Instance // by id; guarded by mu
	snaps     map[string]Snapshot // by id; guarded by mu
	instNames map[string]string   // an instance's name to its id; guarded by mu
	snapNames map[string]string   // a snapshot's name to its id; guarded by mu
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
	c.insts, c.instNames = make(map[string]Instance, len(insts)), make(map[string]string, len(insts))
	for _, in := range insts {
		c.insts[in.ID], c.instNames[in.Name] = in, in.ID
	}
	c.snaps, c.snapNames = make(map[string]Snapshot, len(snaps)), make(map[string]string, len(snaps))
	for _, sn := range snaps {
		c.snaps[sn.ID], c.snapNames[sn.Name] = sn, sn.ID
	}
	return nil
}

// apply records one committed write. A record is kept as a read of the
// database would return it (asStored), not as its writer passed it; a
// name is a record's until it is renamed or deleted (names are unique).
func (c *recordCache) apply(ch Change) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.insts == nil { // not loaded: a write before load (the migrations')
		return
	}
	switch {
	case ch.Instance != nil:
		if old, ok := c.insts[ch.Instance.ID]; ok {
			if c.instNames[old.Name] == old.ID { // a name freed may already be another's
				delete(c.instNames, old.Name)
			}
			delete(c.insts, old.ID)
		}
		if ch.Op != Deleted {
			in := ch.Instance.asStored()
			c.insts[in.ID], c.instNames[in.Name] = in, in.ID
		}
	case ch.Snapshot != nil:
		if old, ok := c.snaps[ch.Snapshot.ID]; ok {
			if c.snapNames[old.Name] == old.ID {
				delete(c.snapNames, old.Name)
			}
			delete(c.snaps, old.ID)
		}
		if ch.Op != Deleted {
			sn := ch.Snapshot.asStored()
			c.snaps[sn.ID], c.snapNames[sn.Name] = sn, sn.ID
		}
	}
}

func (c *recordCache) instance(id string) (Instance, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	in, ok := c.insts[id]
	return in, ok
}

func (c *recordCache) snapshot(id string) (Snapshot, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	sn, ok := c.snaps[id]
	return sn, ok
}

// instancesMatching is refMatch over the cache: the instance named ref and
// every one whose id is in [ref, idPrefixEnd(ref)), oldest first.
func (c *recordCache) instancesMatching(ref string) []Instance {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return matching(c.insts, c.instNames, ref, func(in Instance) (int64, string) { return in.CreatedAt.UnixNano(), in.ID })
}

// snapshotsMatching is instancesMatching for snapshots.
func (c *recordCache) snapshotsMatching(ref string) []Snapshot {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return matching(c.snaps, c.snapNames, ref, func(sn Snapshot) (int64, string) { return sn.CreatedAt.UnixNano(), sn.ID })
}

// matching is refMatch over records (by id; names: name to id): the record
// named ref and every one whose id is in [ref, idPrefixEnd(ref)), in
// refMatch's order (key: a record's created_at and id). It reads only the
// keys of the records it does not return: a record is hundreds of bytes.
func matching[R any](records map[string]R, names map[string]string, ref string, key func(R) (int64, string)) []R {
	var out []R
	named, ok := names[ref]
	if ok {
		out = append(out, records[named])
	}
	end := idPrefixEnd(ref)
	for id := range records {
		if id >= ref && id < end && (!ok || id != named) {
			out = append(out, records[id])
		}
	}
	slices.SortFunc(out, func(a, b R) int {
		aAt, aID := key(a)
		bAt, bID := key(b)
		return byCreated(aAt, aID, bAt, bID)
	})
	return out
}

// byCreated is refMatch's order: created_at, then id.
func byCreated(aAt int64, aID string, bAt int64, bID string) int {
	if aAt != bAt {
		if aAt < bAt {
			return -1
		}
		return 1
	}
	return strings.Compare(aID, bID)
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
