package emulator

import (
	"fmt"
	"os"
)

// writeMemFile writes guest memory to path with Firecracker's semantics
// (vstate/vm.rs snapshot_memory_to_file):
//   - open for writing without truncation; a file of another size is
//     truncated to 0 first; then set_len(RAM size). So an existing file of
//     the right size is NOT truncated: a Diff into it merges in place.
//   - dirty == nil (Full): every page is written, zeros as data, so a Full
//     file is fully allocated.
//   - dirty != nil (Diff): only dirty pages are written, clean runs are
//     skipped (a sparse file when fresh).
//   - fsync before returning.
//
// It returns the number of pages written.
func writeMemFile(path string, mem *guestMemory, dirty *dirtyBitmap) (uint64, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		return 0, fmt.Errorf("open mem file: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("stat mem file %s: %w", path, err)
	}
	if uint64(st.Size()) != mem.size {
		if err := f.Truncate(0); err != nil {
			return 0, fmt.Errorf("truncate mem file %s: %w", path, err)
		}
	}
	if err := f.Truncate(int64(mem.size)); err != nil {
		return 0, fmt.Errorf("set_len mem file %s to %d: %w", path, mem.size, err)
	}
	var written uint64
	for r, reg := range mem.regions {
		b := mem.maps[r]
		if dirty == nil {
			if _, err := f.WriteAt(b, int64(reg.Offset)); err != nil {
				return written, fmt.Errorf("write mem file %s region at %d: %w", path, reg.Offset, err)
			}
			written += reg.Size / pageSize
			continue
		}
		// Runs of dirty pages inside this region (a run never crosses a
		// region: the host mappings are separate).
		first := reg.Offset / pageSize
		n := reg.Size / pageSize
		for i := uint64(0); i < n; {
			if !dirty.isDirty(first + i) {
				i++
				continue
			}
			j := i
			for j < n && dirty.isDirty(first+j) {
				j++
			}
			if _, err := f.WriteAt(b[i*pageSize:j*pageSize], int64(reg.Offset+i*pageSize)); err != nil {
				return written, fmt.Errorf("write mem file %s dirty pages at %d: %w", path, reg.Offset+i*pageSize, err)
			}
			written += j - i
			i = j
		}
	}
	if err := f.Sync(); err != nil {
		return written, fmt.Errorf("fsync mem file %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return written, fmt.Errorf("close mem file %s: %w", path, err)
	}
	return written, nil
}

type snapshotCreate struct {
	SnapshotType string  `json:"snapshot_type"`
	SnapshotPath *string `json:"snapshot_path"`
	MemFilePath  *string `json:"mem_file_path"`
}

// createSnapshot is PUT /snapshot/create. The mem-file is written first and
// the vmstate last (temp + rename), so the vmstate is the commit point: a
// crash in between leaves a vmstate that does not match the memory, which
// the workload reports at its first step.
func (v *vmm) createSnapshot(req snapshotCreate) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.postBoot(); err != nil {
		return err
	}
	if v.st != statePaused {
		return errNotStopped
	}
	wl := v.wl.Load()
	var dirty *dirtyBitmap
	switch req.SnapshotType {
	case "", "Full":
	case "Diff":
		dirty = wl.dirty
		if dirty == nil {
			if !v.rel.diffWithoutTracking() {
				return fault("The requested operation is not supported: Diff snapshots are not allowed on uVMs with dirty page tracking disabled.")
			}
			// 1.13+: mincore stands in for the dirty log.
			var err error
			if dirty, err = residentPages(v.mem); err != nil {
				return faultf("Create snapshot error: Cannot get dirty bitmap: %v", err)
			}
		}
	default:
		return faultf("unknown variant `%s`, expected `Full` or `Diff`", req.SnapshotType)
	}
	n, err := writeMemFile(*req.MemFilePath, v.mem, dirty)
	if err != nil {
		// The dirty log is kept: a retry writes the same pages.
		return faultf("Create snapshot error: %v", err)
	}
	st := &vmState{VMMVersion: v.version, FirecrackerVersion: v.rel.String(), SnapshotVersion: v.snap, Machine: v.machine, Drives: v.drives, Interfaces: v.ifaces,
		Regions: v.mem.regions, Workload: wl.state()}
	if v.boot != nil {
		st.BootArgs = v.boot.BootArgs
	}
	if err := writeVMState(*req.SnapshotPath, st); err != nil {
		return faultf("Create snapshot error: %v", err)
	}
	// Only a complete snapshot restarts the dirty log.
	if wl.dirty != nil {
		wl.dirty.reset()
	}
	typ := req.SnapshotType
	if typ == "" {
		typ = "Full"
	}
	v.log.Info("snapshot created", "type", typ, "snapshot", *req.SnapshotPath, "mem_file", *req.MemFilePath,
		"pages_written", n, "steps", st.Workload.Steps)
	return nil
}
