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
