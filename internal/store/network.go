package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
)

// ErrPoolExhausted is returned when every slot of the network pool is
// taken; ErrPortTaken when a publish names a host port another instance
// already publishes.
var (
	ErrPoolExhausted = errors.New("address pool exhausted")
	ErrPortTaken     = errors.New("host port already published")
)

// Publish is one published port of an instance (HostIP "" = every address).
type Publish struct {
	HostIP    string
	HostPort  int
	GuestPort int
	Protocol  string
}

// CreateNetworkedInstance inserts in with the lowest free slot of a pool of
// slots slots (set in in.NetSlot) and its publishes, in one transaction:
// the allocation is durable with the record or not at all. A full pool is
// ErrPoolExhausted, a published port taken (same protocol and port, and the
// same host IP or either one every address) ErrPortTaken, a taken id or
// name ErrExists; none of them leaves anything behind.
func (s *Store) CreateNetworkedInstance(ctx context.Context, in *Instance, slots int, pubs []Publish) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("create instance %s: %w", in.ID, err)
	}
	defer tx.Rollback()
	if err := createNetworkedInstance(ctx, tx, in, slots, pubs); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		in.Networked, in.NetSlot = false, 0
		return fmt.Errorf("create instance %s: %w", in.ID, err)
	}
	s.instanceChanged(Created, *in)
	return nil
}

// CreateNetworkedInstance is Store.CreateNetworkedInstance inside the
// group: the slot, the record and its publishes are committed with the
// rest of the unit (a fork's journal entry), or not at all.
func (t *Tx) CreateNetworkedInstance(in *Instance, slots int, pubs []Publish) error {
	return t.changed(createNetworkedInstance(t.ctx, t.w.tx, in, slots, pubs), Created, *in)
}

// createNetworkedInstance is CreateNetworkedInstance's writes, in tx.
func createNetworkedInstance(ctx context.Context, tx *sql.Tx, in *Instance, slots int, pubs []Publish) error {
	if err := publishesFree(ctx, tx, in.ID, pubs); err != nil {
		return err
	}
	// A ready warm slot if there is one (its network is already made),
	// else the lowest free one.
	var slot int
	err := tx.QueryRowContext(ctx, `SELECT slot FROM net_warm WHERE ready = 1 ORDER BY slot LIMIT 1`).Scan(&slot)
	switch {
	case err == nil:
		if _, err := tx.ExecContext(ctx, `DELETE FROM net_warm WHERE slot = ?`, slot); err != nil {
			return fmt.Errorf("create instance %s: take warm slot %d: %w", in.ID, slot, err)
		}
		in.NetWarm = true
	case errors.Is(err, sql.ErrNoRows):
		if slot, err = lowestFreeSlot(ctx, tx, slots); err != nil {
			return fmt.Errorf("create instance %s: %w", in.ID, err)
		}
		in.NetWarm = false
	default:
		return fmt.Errorf("create instance %s: allocate a network slot: %w", in.ID, err)
	}
	in.Networked, in.NetSlot = true, slot
	if err := insertNetworked(ctx, tx, *in, pubs); err != nil {
		in.Networked, in.NetSlot = false, 0
		return err
	}
	return nil
}

// ErrSlotTaken is returned by RestoreNetworkedInstance when another
// instance holds the slot, or the slot is outside the pool.
var ErrSlotTaken = errors.New("network slot not free")

// RestoreNetworkedInstance inserts in, a networked instance whose record
// was lost while what it holds is known (a fork's directory carries it),
// with the slot it holds (in.NetSlot) and its publishes, in one
// transaction. The slot must be in the pool (below slots) and held by no
// other instance: a warm row holding it is dropped, as a fork that took a
// warm slot did. A slot held is ErrSlotTaken, a published port taken
// ErrPortTaken, a taken id or name ErrExists; none leaves anything behind.
func (s *Store) RestoreNetworkedInstance(ctx context.Context, in Instance, slots int, pubs []Publish) error {
	if !in.Networked {
		return fmt.Errorf("restore instance %s: not networked", in.ID)
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("restore instance %s: %w", in.ID, err)
	}
	defer tx.Rollback()
	if in.NetSlot < 0 || in.NetSlot >= slots {
		return fmt.Errorf("restore instance %s: slot %d: %w (the pool has %d)", in.ID, in.NetSlot, ErrSlotTaken, slots)
	}
	var other string
	err = tx.QueryRowContext(ctx, `SELECT id FROM instances WHERE net_slot = ? LIMIT 1`, in.NetSlot).Scan(&other)
	if err == nil {
		return fmt.Errorf("restore instance %s: slot %d: %w: instance %s holds it", in.ID, in.NetSlot, ErrSlotTaken, other)
	}
	if !errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("restore instance %s: %w", in.ID, err)
	}
	if err := publishesFree(ctx, tx, in.ID, pubs); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM net_warm WHERE slot = ?`, in.NetSlot); err != nil {
		return fmt.Errorf("restore instance %s: take warm slot %d: %w", in.ID, in.NetSlot, err)
	}
	in.NetWarm = false
	if err := insertNetworked(ctx, tx, in, pubs); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("restore instance %s: %w", in.ID, err)
	}
	s.instanceChanged(Created, in)
	return nil
}

// publishesFree fails with ErrPortTaken when another instance publishes
// one of pubs' ports (same protocol and port, and the same host IP or
// either one every address).
func publishesFree(ctx context.Context, tx *sql.Tx, id string, pubs []Publish) error {
	for _, p := range pubs {
		var other string
		err := tx.QueryRowContext(ctx, `SELECT instance_id FROM publishes WHERE protocol = ? AND host_port = ?
			AND (host_ip = ? OR host_ip = '' OR ? = '') LIMIT 1`, p.Protocol, p.HostPort, p.HostIP, p.HostIP).Scan(&other)
		if err == nil {
			return fmt.Errorf("publish %d/%s: %w by instance %s", p.HostPort, p.Protocol, ErrPortTaken, other)
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("check the publishes of instance %s: %w", id, err)
		}
	}
	return nil
}

// insertNetworked inserts in (its slot chosen) and its publishes.
func insertNetworked(ctx context.Context, tx *sql.Tx, in Instance, pubs []Publish) error {
	if _, err := tx.ExecContext(ctx, `INSERT INTO instances (`+instanceCols+`) VALUES (`+marks(instanceCols)+`)`, in.args()...); err != nil {
		if isUnique(err) {
			return fmt.Errorf("create instance %s (%q): %w", in.ID, in.Name, ErrExists)
		}
		return fmt.Errorf("create instance %s: %w", in.ID, err)
	}
	for _, p := range pubs {
		if _, err := tx.ExecContext(ctx, `INSERT INTO publishes (instance_id, host_ip, host_port, protocol, guest_port) VALUES (?,?,?,?,?)`,
			in.ID, p.HostIP, p.HostPort, p.Protocol, p.GuestPort); err != nil {
			if isUnique(err) {
				return fmt.Errorf("publish %d/%s: %w", p.HostPort, p.Protocol, ErrPortTaken)
			}
			return fmt.Errorf("create instance %s: publish: %w", in.ID, err)
		}
	}
	return nil
}

// heldSlots is every slot an instance or a warm row holds.
const heldSlots = `SELECT net_slot AS s FROM instances WHERE net_slot >= 0 UNION ALL SELECT slot FROM net_warm`

// lowestFreeSlot is the lowest slot below slots that neither an instance
// nor a warm row holds: 0, else one past a held slot whose successor is
// free. ErrPoolExhausted if none.
func lowestFreeSlot(ctx context.Context, tx *sql.Tx, slots int) (int, error) {
	var slot int
	err := tx.QueryRowContext(ctx, `WITH held AS (`+heldSlots+`) SELECT CASE
		WHEN NOT EXISTS (SELECT 1 FROM held WHERE s = 0) THEN 0
		ELSE (SELECT MIN(a.s) + 1 FROM held a WHERE NOT EXISTS (SELECT 1 FROM held b WHERE b.s = a.s + 1)) END`).Scan(&slot)
	if err != nil {
		return 0, fmt.Errorf("allocate a network slot: %w", err)
	}
	if slot >= slots {
		return 0, fmt.Errorf("%w (%d addresses, all in use)", ErrPoolExhausted, slots)
	}
	return slot, nil
}

// WarmSlot is a network slot made ahead of any VM.
type WarmSlot struct {
	Slot  int
	Ready bool // its network is whole; false: being made, or a crash interrupted that
}

// ReserveWarmSlot records, in the group, a new warm slot (not ready), the
// lowest free one, before its network is made. ErrPoolExhausted if none is
// free. (The pool's only writer commits it in a group: there is no Store
// form.)
func (t *Tx) ReserveWarmSlot(slots int) (int, error) {
	slot, err := lowestFreeSlot(t.ctx, t.w.tx, slots)
	if err != nil {
		return 0, fmt.Errorf("reserve warm slot: %w", err)
	}
	if _, err := t.w.tx.ExecContext(t.ctx, `INSERT INTO net_warm (slot, ready) VALUES (?, 0)`, slot); err != nil {
		return 0, fmt.Errorf("reserve warm slot %d: %w", slot, err)
	}
	return slot, nil
}

// SetWarmReady marks a warm slot's network whole.
func (s *Store) SetWarmReady(ctx context.Context, slot int) error {
	return setWarmReady(ctx, s.w(), slot)
}

// SetWarmReady is Store.SetWarmReady inside the group.
func (t *Tx) SetWarmReady(slot int) error { return setWarmReady(t.ctx, t.w, slot) }

func setWarmReady(ctx context.Context, x execer, slot int) error {
	if _, err := x.ExecContext(ctx, `UPDATE net_warm SET ready = 1 WHERE slot = ?`, slot); err != nil {
		return fmt.Errorf("warm slot %d ready: %w", slot, err)
	}
	return nil
}

// DeleteWarmSlot forgets a warm slot (none is not an error).
func (s *Store) DeleteWarmSlot(ctx context.Context, slot int) error {
	if _, err := s.db.ExecContext(ctx, `DELETE FROM net_warm WHERE slot = ?`, slot); err != nil {
		return fmt.Errorf("delete warm slot %d: %w", slot, err)
	}
	return nil
}

// TakeWarmSlot deletes a warm row and reports whether this call deleted
// it (false: a create took it, or it was never there).
func (s *Store) TakeWarmSlot(ctx context.Context, slot int) (bool, error) {
	res, err := s.db.ExecContext(ctx, `DELETE FROM net_warm WHERE slot = ?`, slot)
	if err != nil {
		return false, fmt.Errorf("take warm slot %d: %w", slot, err)
	}
	n, _ := res.RowsAffected()
	return n == 1, nil
}

// WarmSlots lists the warm slots.
func (s *Store) WarmSlots(ctx context.Context) ([]WarmSlot, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT slot, ready FROM net_warm ORDER BY slot`)
	if err != nil {
		return nil, fmt.Errorf("list warm slots: %w", err)
	}
	defer rows.Close()
	var out []WarmSlot
	for rows.Next() {
		var w WarmSlot
		if err := rows.Scan(&w.Slot, &w.Ready); err != nil {
			return nil, fmt.Errorf("list warm slots: %w", err)
		}
		out = append(out, w)
	}
	return out, rows.Err()
}

// Publishes returns the publishes of every instance, by instance id.
func (s *Store) Publishes(ctx context.Context) (map[string][]Publish, error) {
	rows, err := s.r().QueryContext(ctx, `SELECT instance_id, host_ip, host_port, protocol, guest_port FROM publishes ORDER BY instance_id, host_port`)
	if err != nil {
		return nil, fmt.Errorf("list publishes: %w", err)
	}
	defer rows.Close()
	out := map[string][]Publish{}
	for rows.Next() {
		var id string
		var p Publish
		if err := rows.Scan(&id, &p.HostIP, &p.HostPort, &p.Protocol, &p.GuestPort); err != nil {
			return nil, fmt.Errorf("list publishes: %w", err)
		}
		out[id] = append(out[id], p)
	}
	return out, rows.Err()
}

// InstancePublishes returns one instance's publishes.
func (s *Store) InstancePublishes(ctx context.Context, id string) ([]Publish, error) {
	rows, err := s.r().QueryContext(ctx, `SELECT host_ip, host_port, protocol, guest_port FROM publishes WHERE instance_id = ? ORDER BY host_port`, id)
	if err != nil {
		return nil, fmt.Errorf("publishes of %s: %w", id, err)
	}
	defer rows.Close()
	var out []Publish
	for rows.Next() {
		var p Publish
		if err := rows.Scan(&p.HostIP, &p.HostPort, &p.Protocol, &p.GuestPort); err != nil {
			return nil, fmt.Errorf("publishes of %s: %w", id, err)
		}
		out = append(out, p)
	}
	return out, rows.Err()
}
