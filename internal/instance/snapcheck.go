package instance

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/store"
)

// memFileFits checks, before a restore or fork uses it, that a snapshot
// dir's mem-file holds all of the VM's RAM. A shorter file is damaged
// (truncated by hand, by a full disk, by a bad copy): Firecracker would map
// past its end, and the pager refuses the regions. Before this check a Uffd
// restore of such a file failed after 10 s with "context deadline exceeded"
// (the cause only in the pager's log), and a fork of it succeeded and
// inherited the damage.
func memFileFits(what string, d guestdir.SnapDir, memMiB int) error {
	if err := memFileShort(d, memMiB); err != nil {
		return fmt.Errorf("%w: %s is damaged: %v; it cannot be restored or forked", api.ErrInvalidState, what, err)
	}
	return nil
}

// memFileShort says how d's mem-file falls short of memMiB of RAM, or nil.
func memFileShort(d guestdir.SnapDir, memMiB int) error {
	st, err := os.Stat(d.Memory())
	return memFileShortStat(d, st, err, memMiB)
}

// memFileShortStat is memFileShort given the stat of d's mem-file (its
// FileInfo and error).
func memFileShortStat(d guestdir.SnapDir, st os.FileInfo, err error, memMiB int) error {
	if err != nil {
		return fmt.Errorf("its mem-file: %w", err)
	}
	if want := int64(memMiB) << 20; st.Size() < want {
		return fmt.Errorf("its mem-file %s is %d bytes, shorter than its %d MiB of RAM (%d bytes)", d.Memory(), st.Size(), memMiB, want)
	}
	return nil
}

// snapshotIntact reports what is missing from a store snapshot's directory,
// or nil: it needs its vmstate, its disk, and its mem-file (raw, or
// compressed until materialised). raw says the raw mem-file is there, and
// then it holds all of the RAM (memFileShort): a fork needs to look at it
// no further.
func snapshotIntact(d guestdir.SnapDir, memMiB int) (raw bool, err error) {
	if st, err := os.Lstat(d.Dir); err != nil || !st.IsDir() {
		return false, fmt.Errorf("its directory %s is gone", d.Dir)
	}
	for _, p := range []string{d.VMState(), d.Rootfs()} {
		if st, err := os.Stat(p); err != nil || !st.Mode().IsRegular() {
			return false, fmt.Errorf("%s is missing", p)
		}
	}
	st, rawErr := os.Stat(d.Memory())
	if errors.Is(rawErr, os.ErrNotExist) {
		if _, err := os.Stat(d.MemoryZst()); err != nil {
			return false, fmt.Errorf("its mem-file (%s or %s) is missing", d.Memory(), d.MemoryZst())
		}
		return false, nil
	}
	if err := memFileShortStat(d, st, rawErr, memMiB); err != nil {
		return false, err
	}
	return true, nil
}

// markIfBroken records a store snapshot whose directory is gone or
// incomplete as broken (and says so in the log), so that it is listed as
// what it is and refuses forks instead of failing them obscurely. It
// reports whether the snapshot is broken, and if not, whether its raw
// mem-file is there whole (snapshotIntact's raw).
func (m *Manager) markIfBroken(ctx context.Context, sn *store.Snapshot) (broken, raw bool) {
	sd, err := m.layout.Snapshot(sn.ID)
	if err != nil {
		return false, false
	}
	raw, why := snapshotIntact(sd, sn.MemoryMiB)
	if why == nil {
		return false, raw
	}
	m.log.Error("snapshot is broken: it refuses forks and can only be deleted", "snapshot", sn.ID, "name", sn.Name, "reason", why)
	sn.State = snapBroken
	if err := m.db.UpdateSnapshot(ctx, *sn); err != nil {
		m.log.Error("record broken snapshot", "snapshot", sn.ID, "err", err)
	}
	return true, false
}

// brokenError is the refusal of a fork of a broken snapshot.
func brokenError(sn store.Snapshot, sd guestdir.SnapDir) error {
	_, why := snapshotIntact(sd, sn.MemoryMiB)
	if why == nil {
		why = errors.New("it was found incomplete")
	}
	return fmt.Errorf("%w: snapshot %q is broken (%v): it cannot be forked; delete it (`forkd snapshot rm %s`)",
		api.ErrInvalidState, sn.Name, why, sn.ID)
}
