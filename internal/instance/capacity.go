package instance

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/capacity"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/store"
)

// holdsRAM are the states in which an instance's VMM runs and holds its
// guest RAM.
var holdsRAM = []string{api.StateRunning, api.StatePaused, api.StateStandingby, api.StateRestoring}

// reserveCapacity asks whether the host can hold req (internal/capacity)
// and returns the release of its reservation, which the caller defers: the
// record shows what runs once the operation has ended. A refusal is
// api.ErrInsufficientResources naming the resource and the shortfall.
func (m *Manager) reserveCapacity(ctx context.Context, op string, req capacity.Request) (func(), error) {
	running := func() ([]capacity.Running, error) {
		all, err := m.db.ListInstances(ctx)
		if err != nil {
			return nil, err
		}
		var out []capacity.Running
		for _, in := range all {
			if oneOf(in.State, holdsRAM...) {
				out = append(out, capacity.Running{ID: in.ID, MemoryMiB: in.MemoryMiB})
			}
		}
		return out, nil
	}
	release, err := m.capacity.Reserve(req, running)
	if errors.Is(err, capacity.ErrInsufficient) {
		m.met.capacityRefusals.WithLabelValues(op, resourceOf(err)).Inc()
		m.log.Warn("request refused: the host cannot hold it", "op", op, "instance", req.ID, "err", err)
		return nil, fmt.Errorf("%w: %s: %v", api.ErrInsufficientResources, op, err)
	}
	return release, err
}

func resourceOf(err error) string {
	var e *capacity.Error
	if errors.As(err, &e) {
		return e.Resource
	}
	return ""
}

// copyCost is what copying path costs where the filesystem cannot reflink:
// its allocated bytes (a sparse disk costs its data, not its size); 0 where
// it can, or when the file is missing.
func (m *Manager) copyCost(path string) int64 {
	if m.fs.reflink {
		return 0
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0
	}
	return st.Blocks * 512
}

// snapshotCost is at most what writing a snapshot into dir will take on
// disk: a Full snapshot (no mem-file yet) writes the whole RAM; a Diff into a
// mem-file others share first unshares it, a whole-RAM copy where the
// filesystem cannot reflink (with reflinks the clone is free and only the
// dirty pages get new blocks, which the reserve covers); a Diff into a
// private base writes in place, allocating at most its holes.
func (m *Manager) snapshotCost(dir guestdir.SnapDir, memMiB int) int64 {
	ram := int64(memMiB) << 20
	var st syscall.Stat_t
	if err := syscall.Stat(dir.Memory(), &st); err != nil {
		return ram
	}
	if st.Nlink > 1 {
		if m.fs.reflink {
			return 0
		}
		return ram
	}
	return max(0, ram-st.Blocks*512)
}

// forkCost is what a fork of a VM with memMiB of RAM and the disk at rootfs
// will take: its disk clone (none when the disk is linked: the disk guard's
// copy is its first launch's, see reserveRunning), and, where the filesystem cannot reflink, the
// whole-RAM copy its first standby makes (the unshare guard's private copy
// of the mem-file it shares with its source).
func (m *Manager) forkCost(rootfs string, memMiB int, hasMemory bool) int64 {
	n := m.diskShareCost(rootfs)
	// fork_strategy copy writes the whole RAM at once (benchmarks only).
	if hasMemory && (!m.fs.reflink || m.cfg.ForkStrategy == ForkStrategyCopy) {
		n += int64(memMiB) << 20
	}
	return n
}

// reserveRunning reserves the instance in as a running VM (start, restore),
// with the private copy of its disk the disk guard makes at its launch if
// other names link the disk.
func (m *Manager) reserveRunning(ctx context.Context, op string, in store.Instance) (func(), error) {
	var disk int64
	if g, err := m.guest(in.ID); err == nil {
		disk = m.diskUnshareCost(g.Rootfs())
	}
	return m.reserveCapacity(ctx, op, capacity.Request{ID: in.ID, MemoryMiB: in.MemoryMiB, Vcpus: in.Vcpus, Runs: true, DiskBytes: disk,
		HugePages: in.Huge(), Boots: op == "start"})
}
