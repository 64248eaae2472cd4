package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Instance is one row of the instances table: the API's instance fields
// plus what the manager needs to find its VMM and pager session again.
type Instance struct {
	ID               string
	Name             string
	State            string
	Vcpus            int
	MemoryMiB        int
	Kernel           string // user kernel path, or "" for the guest dir's own
	Rootfs           string // the path the user gave at create (informational)
	BootArgs         string
	CreatedAt        time.Time
	Source           string
	SnapshotCacheKey string
	MemoryCheck      string
	ForkMode         string
	RestoreBackend   string
	Pid              int
	Error            string
	PagerSession     string // pager session serving this VM's memory, "" if none
	PagerVersion     string // version of the pager owning PagerSession
	// Networked VMs hold NetSlot, their slot in the network pool, from
	// CreateNetworkedInstance (which allocates it) until the row is
	// deleted. NetGuest (the guest's CIDR) and NetMAC are the guest
	// identity it booted with; forks inherit them.
	Networked bool
	NetSlot   int
	NetGuest  string
	NetMAC    string
	// Image is the manifest digest of the image the disk came from, "" for
	// none; forks inherit it.
	Image string
	// NetWarm is set by CreateNetworkedInstance (never stored) when the
	// slot it took was warm: its network is already whole.
	NetWarm  bool
	VsockCID uint32 // guest CID of the VM's vsock device; 0: none
	// HugePages is "" for guest memory of 4 KiB pages, or api.HugePages2M;
	// fixed at create, inherited by forks and snapshots.
	HugePages string
}

// Huge reports whether the VM's guest memory is backed by huge pages.
func (in Instance) Huge() bool { return in.HugePages != "" }

const instanceCols = `id, name, state, vcpus, memory_mib, kernel, rootfs, boot_args, created_at, source,
	snapshot_cache_key, memory_check, fork_mode, restore_backend, pid, error, pager_session, pager_version,
	net_slot, net_guest, net_mac, image, vsock_cid, huge_pages`

func (in *Instance) args() []any {
	return []any{in.ID, in.Name, in.State, in.Vcpus, in.MemoryMiB, in.Kernel, in.Rootfs, in.BootArgs,
		in.CreatedAt.UnixNano(), in.Source, in.SnapshotCacheKey, in.MemoryCheck, in.ForkMode,
		in.RestoreBackend, in.Pid, in.Error, in.PagerSession, in.PagerVersion, in.slotColumn(), in.NetGuest, in.NetMAC, in.Image, in.VsockCID, in.HugePages}
}

// slotColumn is net_slot: -1 for an instance without network.
func (in *Instance) slotColumn() int {
	if !in.Networked {
		return -1
	}
	return in.NetSlot
}

func scanInstance(row interface{ Scan(...any) error }) (Instance, error) {
	var in Instance
	var created int64
	err := row.Scan(&in.ID, &in.Name, &in.State, &in.Vcpus, &in.MemoryMiB, &in.Kernel, &in.Rootfs,
		&in.BootArgs, &created, &in.Source, &in.SnapshotCacheKey, &in.MemoryCheck, &in.ForkMode,
		&in.RestoreBackend, &in.Pid, &in.Error, &in.PagerSession, &in.PagerVersion, &in.NetSlot, &in.NetGuest, &in.NetMAC, &in.Image, &in.VsockCID, &in.HugePages)
	in.CreatedAt = time.Unix(0, created).UTC()
	in.Networked = in.NetSlot >= 0
	if !in.Networked {
		in.NetSlot = 0
	}
	return in, err
}

// CreateInstance inserts a new instance. A taken id or name is ErrExists:
// the UNIQUE constraint is what admits names, so two concurrent creates or
// forks with one name cannot both win.
func (s *Store) CreateInstance(ctx context.Context, in Instance) error {
	if err := createInstance(ctx, s.w(), in); err != nil {
		return err
	}
	s.instanceChanged(Created, in)
	return nil
}

// The instance writes, prepared once (stmts.go), and the hot read.
var qInstanceInsert = `INSERT INTO instances (` + instanceCols + `) VALUES (` + marks(instanceCols) + `)`

const (
	qInstanceUpdate = `UPDATE instances SET name=?, state=?, vcpus=?, memory_mib=?, kernel=?, rootfs=?,
		boot_args=?, created_at=?, source=?, snapshot_cache_key=?, memory_check=?, fork_mode=?, restore_backend=?,
		pid=?, error=?, pager_session=?, pager_version=?, net_slot=?, net_guest=?, net_mac=?, image=?, vsock_cid=?, huge_pages=? WHERE id=?`
	qInstanceDelete = `DELETE FROM instances WHERE id = ?`
	qInstanceGet    = `SELECT ` + instanceCols + ` FROM instances WHERE id = ?`
)

func createInstance(ctx context.Context, x execer, in Instance) error {
	_, err := x.ExecContext(ctx, qInstanceInsert, in.args()...)
	if isUnique(err) {
		return fmt.Errorf("create instance %s (%q): %w", in.ID, in.Name, ErrExists)
	}
	if err != nil {
		return fmt.Errorf("create instance %s: %w", in.ID, err)
	}
	return nil
}

// GetInstance returns the instance with exactly this id (from the cache).
func (s *Store) GetInstance(ctx context.Context, id string) (Instance, error) {
	if in, ok := s.cache.instance(id); ok {
		return in, nil
	}
	return Instance{}, fmt.Errorf("instance %s: %w", id, ErrNotFound)
}

// getInstanceSQL is GetInstance from the database (the cache's tests).
func (s *Store) getInstanceSQL(ctx context.Context, id string) (Instance, error) {
	in, err := scanInstance(s.r().QueryRowContext(ctx, qInstanceGet, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Instance{}, fmt.Errorf("instance %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return Instance{}, fmt.Errorf("get instance %s: %w", id, err)
	}
	return in, nil
}

// ListInstances returns all instances, oldest first.
func (s *Store) ListInstances(ctx context.Context) ([]Instance, error) {
	rows, err := s.r().QueryContext(ctx, `SELECT `+instanceCols+` FROM instances ORDER BY created_at, id`)
	if err != nil {
		return nil, fmt.Errorf("list instances: %w", err)
	}
	defer rows.Close()
	var out []Instance
	for rows.Next() {
		in, err := scanInstance(rows)
		if err != nil {
			return nil, fmt.Errorf("list instances: %w", err)
		}
		out = append(out, in)
	}
	return out, rows.Err()
}

// InstancesMatching returns the instances a reference could name: the one
// named ref, and every one whose id starts with ref (the full id included).
// Deciding which of them ref means is the caller's. Every operation on an
// instance resolves its reference, so this is answered from the cache.
func (s *Store) InstancesMatching(ctx context.Context, ref string) ([]Instance, error) {
	return s.cache.instancesMatching(ref), nil
}

// instancesMatchingSQL is InstancesMatching from the database (the cache's
// tests). Both terms are index lookups (the name's unique index, a range of
// the id's), never a scan of every record.
func (s *Store) instancesMatchingSQL(ctx context.Context, ref string) ([]Instance, error) {
	rows, err := s.r().QueryContext(ctx, `SELECT `+instanceCols+` FROM instances`+refMatch, refArgs(ref)...)
	if err != nil {
		return nil, fmt.Errorf("find instances %q: %w", ref, err)
	}
	defer rows.Close()
	var out []Instance
	for rows.Next() {
		in, err := scanInstance(rows)
		if err != nil {
			return nil, fmt.Errorf("find instances %q: %w", ref, err)
		}
		out = append(out, in)
	}
	return out, rows.Err()
}

// refMatch is the condition and order of a reference lookup
// (InstancesMatching, SnapshotsMatching) over refArgs: the record named
// ref, and every one whose id is in the range [ref, idPrefixEnd(ref)),
// both index lookups.
const refMatch = ` WHERE name = ? OR (id >= ? AND id < ?) ORDER BY created_at, id`

// refArgs are refMatch's arguments for ref.
func refArgs(ref string) []any { return []any{ref, ref, idPrefixEnd(ref)} }

// idPrefixEnd is the end of the id range [ref, idPrefixEnd(ref)) that holds
// exactly the ids starting with ref, as an index can look it up: a string
// at or above ref and below ref+"~" starts with ref (where it first differs
// from ref it is greater, and so greater than ref+"~" too), and every id
// starting with ref is in it, its next byte being a lowercase hex digit,
// below '~'.
func idPrefixEnd(ref string) string { return ref + "~" }

// UpdateInstance replaces every field of an existing instance.
func (s *Store) UpdateInstance(ctx context.Context, in Instance) error {
	if err := updateInstance(ctx, s.w(), in); err != nil {
		return err
	}
	s.instanceChanged(Updated, in)
	return nil
}

func updateInstance(ctx context.Context, x execer, in Instance) error {
	a := in.args()
	res, err := x.ExecContext(ctx, qInstanceUpdate, append(a[1:], a[0])...)
	if isUnique(err) {
		return fmt.Errorf("update instance %s (%q): %w", in.ID, in.Name, ErrExists)
	}
	if err != nil {
		return fmt.Errorf("update instance %s: %w", in.ID, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("update instance %s: %w", in.ID, ErrNotFound)
	}
	return nil
}

// DeleteInstance removes an instance row. A missing row is ErrNotFound.
func (s *Store) DeleteInstance(ctx context.Context, id string) error {
	if err := deleteInstance(ctx, s.w(), id); err != nil {
		return err
	}
	s.instanceChanged(Deleted, Instance{ID: id})
	return nil
}

func deleteInstance(ctx context.Context, x execer, id string) error {
	res, err := x.ExecContext(ctx, qInstanceDelete, id)
	if err != nil {
		return fmt.Errorf("delete instance %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("delete instance %s: %w", id, ErrNotFound)
	}
	return nil
}

// CountInstancesByState returns how many instances are in each state.
func (s *Store) CountInstancesByState(ctx context.Context) (map[string]int, error) {
	rows, err := s.r().QueryContext(ctx, `SELECT state, COUNT(*) FROM instances GROUP BY state`)
	if err != nil {
		return nil, fmt.Errorf("count instances: %w", err)
	}
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var st string
		var n int
		if err := rows.Scan(&st, &n); err != nil {
			return nil, fmt.Errorf("count instances: %w", err)
		}
		out[st] = n
	}
	return out, rows.Err()
}
