package emulator

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// writeMemFile writes guest memory to path with Firecracker's semantics
// (snapshot_memory_to_file):
//   - open for writing without truncation; a file of another size is
//     truncated to 0 first; then set_len(RAM size). So an existing file of
//     the right size is NOT truncated: a Diff into it merges in place.
//   - takeDirty == nil (Full): every page is written, zeros as data, so a
//     Full file is fully allocated.
//   - takeDirty != nil (Diff): it is called once the file is sized, as
//     Firecracker reads (and so clears) KVM's dirty log there, and only the
//     pages it returns are written; clean runs are skipped (a sparse file
//     when fresh).
//   - fsync before returning.
//
// It returns the number of pages written. crash, when set, is called after
// half the pages to write (the test hook FORKD_TEST_VMM_CRASH_AT=memory).
func writeMemFile(path string, mem *guestMemory, takeDirty func() (*dirtyBitmap, error), crash func(*os.File)) (uint64, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		return 0, faultf("Cannot perform open on the memory backing file: %v", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, faultf("Cannot perform get_metadata on the memory backing file: %v", err)
	}
	if uint64(st.Size()) != mem.size {
		if err := f.Truncate(0); err != nil {
			return 0, faultf("Cannot perform truncate on the memory backing file: %v", err)
		}
	}
	if err := f.Truncate(int64(mem.size)); err != nil {
		return 0, faultf("Cannot perform set_length on the memory backing file: %v", err)
	}
	var dirty *dirtyBitmap
	if takeDirty != nil {
		if dirty, err = takeDirty(); err != nil {
			return 0, faultf("Cannot get dirty bitmap: %v", err)
		}
	}
	var written uint64
	total := mem.pages()
	if dirty != nil {
		total = dirty.count()
	}
	half := total / 2
	if crash != nil && total < 2 {
		crash(f) // nothing to tear: die before the fsync
	}
	write := func(b []byte, off uint64) error {
		if crash != nil && written < half && written+uint64(len(b))/pageSize >= half {
			n := (half - written) * pageSize
			f.WriteAt(b[:n], int64(off))
			crash(f)
		}
		if _, err := f.WriteAt(b, int64(off)); err != nil {
			return faultf("Cannot write memory file: %v", err)
		}
		written += uint64(len(b)) / pageSize
		return nil
	}
	for r, reg := range mem.regions {
		b := mem.maps[r]
		if dirty == nil {
			if err := write(b, reg.Offset); err != nil {
				return written, err
			}
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
			if err := write(b[i*pageSize:j*pageSize], reg.Offset+i*pageSize); err != nil {
				return written, err
			}
			i = j
		}
	}
	if err := f.Sync(); err != nil {
		return written, faultf("Cannot perform sync_all on the memory backing file: %v", err)
	}
	if err := f.Close(); err != nil {
		return written, faultf("Cannot perform close on the memory backing file: %v", err)
	}
	return written, nil
}

type snapshotCreate struct {
	SnapshotType string  `json:"snapshot_type"`
	SnapshotPath *string `json:"snapshot_path"`
	MemFilePath  *string `json:"mem_file_path"`
}

// createSnapshot is PUT /snapshot/create, in Firecracker's order
// (create_snapshot): the vmstate first, written in place
// (writeVMStateInPlace), then the mem-file (writeMemFile). Neither is
// atomic, and no directory is fsynced: a crash midway leaves a torn
// vmstate (refused at load by its length and checksum) or a vmstate whose
// memory is incomplete; knowing which snapshot is whole is the caller's
// business (forkd's journal). A Diff takes the dirty log as it writes the
// memory (a failure after that loses it, as KVM_GET_DIRTY_LOG does); a
// Full clears it once written.
func (v *vmm) createSnapshot(req snapshotCreate) error {
	for _, c := range [][2]string{{"snapshot_path", *req.SnapshotPath}, {"mem_file_path", *req.MemFilePath}} {
		if err := v.confined(c[0], c[1]); err != nil {
			return err
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.postBoot(); err != nil {
		return err
	}
	if v.st != statePaused {
		return errNotStopped
	}
	wl := v.wl.Load()
	var takeDirty func() (*dirtyBitmap, error)
	switch req.SnapshotType {
	case "", "Full":
	case "Diff":
		switch {
		case wl.dirty != nil:
			takeDirty = func() (*dirtyBitmap, error) { return wl.dirty.take(), nil }
		case v.rel.diffWithoutTracking():
			// 1.13+: mincore stands in for the dirty log.
			takeDirty = func() (*dirtyBitmap, error) { return residentPages(v.mem) }
		default:
			return fault("The requested operation is not supported: Diff snapshots are not allowed on uVMs with dirty page tracking disabled.")
		}
	default:
		return deserializeError{fmt.Sprintf("unknown variant `%s`, expected `Diff` or `Full`", req.SnapshotType)}
	}
	st := &vmState{VMMVersion: v.version, FirecrackerVersion: v.rel.String(), SnapshotVersion: v.snap, Machine: v.machine,
		Drives: v.drives, Interfaces: v.ifaces, Regions: v.mem.regions, Workload: wl.state()}
	if v.boot != nil {
		st.BootArgs = v.boot.BootArgs
	} else {
		st.BootArgs = v.bootArgs // a restored VM keeps the boot args it was booted with
	}
	if v.vsock != nil {
		st.Vsock = v.vsock.state()
	}
	if err := writeVMStateInPlace(*req.SnapshotPath, st, v.crashHook("vmstate")); err != nil {
		return faultf("Create snapshot error: %v", err)
	}
	n, err := writeMemFile(*req.MemFilePath, v.mem, takeDirty, v.crashHook("memory"))
	if err != nil {
		return faultf("Create snapshot error: %v", err)
	}
	if takeDirty == nil && wl.dirty != nil {
		wl.dirty.reset() // a Full restarts the dirty log
	}
	typ := req.SnapshotType
	if typ == "" {
		typ = "Full"
	}
	v.log.Info("snapshot created", "type", typ, "snapshot", *req.SnapshotPath, "mem_file", *req.MemFilePath,
		"pages_written", n, "steps", st.Workload.Steps)
	return nil
}

// crashHook is the test hook FORKD_TEST_VMM_CRASH_AT=point: a function that
// makes the write of f durable so far and SIGKILLs this process, as a VMM
// dying in the middle of a snapshot would (nil unless point is named).
func (v *vmm) crashHook(point string) func(f *os.File) {
	if v.crashAt != point {
		return nil
	}
	return func(f *os.File) {
		f.Sync()
		v.log.Warn("test hook: dying in the middle of the snapshot write", "point", point)
		// tgkill, not kill: the seccomp filter allows only the former, and
		// a SIGKILL sent to any thread ends the whole process.
		unix.Tgkill(os.Getpid(), unix.Gettid(), unix.SIGKILL)
		select {}
	}
}
