package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Snapshot is one row of the snapshots table.
type Snapshot struct {
	ID               string
	Name             string
	SourceInstance   string
	CreatedAt        time.Time
	SizeBytes        int64
	Compression      string // "none" | "zstd"
	State            string // "ready" | "compressing" | "compressed"
	SnapshotCacheKey string
	MemoryMiB        int
	Vcpus            int
	Kernel           string // user kernel path of the source, "" for a guest-dir kernel
	BootArgs         string
	// NetGuest and NetMAC are the source's guest network identity ("" if
	// it had no network): forks of the snapshot are networked with it.
	NetGuest string
	NetMAC   string
	Image    string // manifest digest of the source's image, "" for none
	VsockCID uint32 // the source's vsock CID (0: its vmstate has no vsock)
	// HugePages is the source's (Instance.HugePages): its vmstate restores
	// with those pages only.
	HugePages string
}

// Huge reports whether the snapshot's memory is backed by huge pages.
func (sn Snapshot) Huge() bool { return sn.HugePages != "" }

const snapshotCols = `id, name, source_instance, created_at, size_bytes, compression, state,
	snapshot_cache_key, memory_mib, vcpus, kernel, boot_args, net_guest, net_mac, image, vsock_cid, huge_pages`

func (sn *Snapshot) args() []any {
	return []any{sn.ID, sn.Name, sn.SourceInstance, sn.CreatedAt.UnixNano(), sn.SizeBytes, sn.Compression,
		sn.State, sn.SnapshotCacheKey, sn.MemoryMiB, sn.Vcpus, sn.Kernel, sn.BootArgs, sn.NetGuest, sn.NetMAC, sn.Image, sn.VsockCID, sn.HugePages}
}

func scanSnapshot(row interface{ Scan(...any) error }) (Snapshot, error) {
	var sn Snapshot
	var created int64
	err := row.Scan(&sn.ID, &sn.Name, &sn.SourceInstance, &created, &sn.SizeBytes, &sn.Compression,
		&sn.State, &sn.SnapshotCacheKey, &sn.MemoryMiB, &sn.Vcpus, &sn.Kernel, &sn.BootArgs, &sn.NetGuest, &sn.NetMAC, &sn.Image, &sn.VsockCID, &sn.HugePages)
	sn.CreatedAt = time.Unix(0, created).UTC()
	return sn, err
}

// CreateSnapshot inserts a snapshot; a taken id or name is ErrExists.
func (s *Store) CreateSnapshot(ctx context.Context, sn Snapshot) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO snapshots (`+snapshotCols+`) VALUES (`+marks(snapshotCols)+`)`, sn.args()...)
	if isUnique(err) {
		return fmt.Errorf("create snapshot %s (%q): %w", sn.ID, sn.Name, ErrExists)
	}
	if err != nil {
		return fmt.Errorf("create snapshot %s: %w", sn.ID, err)
	}
	s.snapshotChanged(Created, sn)
	return nil
}

// GetSnapshot returns the snapshot with exactly this id (from the cache).
func (s *Store) GetSnapshot(ctx context.Context, id string) (Snapshot, error) {
	if sn, ok := s.cache.snapshot(id); ok {
		return sn, nil
	}
	return Snapshot{}, fmt.Errorf("snapshot %s: %w", id, ErrNotFound)
}

// getSnapshotSQL is GetSnapshot from the database (the cache's tests).
func (s *Store) getSnapshotSQL(ctx context.Context, id string) (Snapshot, error) {
	sn, err := scanSnapshot(s.r().QueryRowContext(ctx, `SELECT `+snapshotCols+` FROM snapshots WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Snapshot{}, fmt.Errorf("snapshot %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return Snapshot{}, fmt.Errorf("get snapshot %s: %w", id, err)
	}
	return sn, nil
}

// ListSnapshots returns all snapshots, oldest first.
func (s *Store) ListSnapshots(ctx context.Context) ([]Snapshot, error) {
	rows, err := s.r().QueryContext(ctx, `SELECT `+snapshotCols+` FROM snapshots ORDER BY created_at, id`)
	if err != nil {
		return nil, fmt.Errorf("list snapshots: %w", err)
	}
	defer rows.Close()
	var out []Snapshot
	for rows.Next() {
		sn, err := scanSnapshot(rows)
		if err != nil {
			return nil, fmt.Errorf("list snapshots: %w", err)
		}
		out = append(out, sn)
	}
	return out, rows.Err()
}

// CacheKeysInUse is every snapshot cache key an instance or a snapshot
// holds, read in one transaction ("" included when some record has none).
// It is what the prefetch recordings' collector keeps; a fleet's records
// are not decoded for it, only their keys.
func (s *Store) CacheKeysInUse(ctx context.Context) (map[string]bool, error) {
	rows, err := s.r().QueryContext(ctx, `SELECT snapshot_cache_key FROM instances UNION SELECT snapshot_cache_key FROM snapshots`)
	if err != nil {
		return nil, fmt.Errorf("list cache keys: %w", err)
	}
	defer rows.Close()
	keys := map[string]bool{}
	for rows.Next() {
		var k string
		if err := rows.Scan(&k); err != nil {
			return nil, fmt.Errorf("list cache keys: %w", err)
		}
		keys[k] = true
	}
	return keys, rows.Err()
}

// SnapshotsMatching returns the snapshots a reference could name: the one
// named ref, and every one whose id starts with ref (the full id included),
// from the cache.
func (s *Store) SnapshotsMatching(ctx context.Context, ref string) ([]Snapshot, error) {
	return s.cache.snapshotsMatching(ref), nil
}

// snapshotsMatchingSQL is SnapshotsMatching from the database (the cache's
// tests).
func (s *Store) snapshotsMatchingSQL(ctx context.Context, ref string) ([]Snapshot, error) {
	rows, err := s.r().QueryContext(ctx, `SELECT `+snapshotCols+` FROM snapshots`+refMatch, refArgs(ref)...)
	if err != nil {
		return nil, fmt.Errorf("find snapshots %q: %w", ref, err)
	}
	defer rows.Close()
	var out []Snapshot
	for rows.Next() {
		sn, err := scanSnapshot(rows)
		if err != nil {
			return nil, fmt.Errorf("find snapshots %q: %w", ref, err)
		}
		out = append(out, sn)
	}
	return out, rows.Err()
}

// UpdateSnapshot replaces every field of an existing snapshot.
func (s *Store) UpdateSnapshot(ctx context.Context, sn Snapshot) error {
	a := sn.args()
	res, err := s.db.ExecContext(ctx, `UPDATE snapshots SET name=?, source_instance=?, created_at=?, size_bytes=?,
		compression=?, state=?, snapshot_cache_key=?, memory_mib=?, vcpus=?, kernel=?, boot_args=?, net_guest=?, net_mac=?, image=?, vsock_cid=?, huge_pages=? WHERE id=?`, append(a[1:], a[0])...)
	if err != nil {
		return fmt.Errorf("update snapshot %s: %w", sn.ID, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("update snapshot %s: %w", sn.ID, ErrNotFound)
	}
	s.snapshotChanged(Updated, sn)
	return nil
}

// DeleteSnapshot removes a snapshot row. A missing row is ErrNotFound.
func (s *Store) DeleteSnapshot(ctx context.Context, id string) error {
	res, err := s.db.ExecContext(ctx, `DELETE FROM snapshots WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("delete snapshot %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("delete snapshot %s: %w", id, ErrNotFound)
	}
	s.snapshotChanged(Deleted, Snapshot{ID: id})
	return nil
}
