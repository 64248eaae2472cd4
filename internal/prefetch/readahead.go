package prefetch

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ReadAhead asks the kernel to read the runs of f into the page cache
// (posix_fadvise WILLNEED), in the runs' order. It starts the reads and
// returns without waiting for them; pages the cache already holds cost
// nothing. Runs past the end of the file are clipped.
func ReadAhead(f *os.File, runs []Run, pageSize uint64) error {
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("readahead %s: %w", f.Name(), err)
	}
	size := uint64(st.Size())
	for _, r := range runs {
		off, n := r.Page*pageSize, r.Pages*pageSize
		if off >= size {
			continue
		}
		n = min(n, size-off)
		if err := unix.Fadvise(int(f.Fd()), int64(off), int64(n), unix.FADV_WILLNEED); err != nil {
			return fmt.Errorf("readahead %s at %d (+%d): %w", f.Name(), off, n, err)
		}
	}
	return nil
}

// Residency reports which pages of a file the page cache holds (mincore
// over a read-only shared mapping of it: mapping it reads nothing).
type Residency struct {
	mem      []byte
	pageSize uint64
	vec      []byte // scratch for mincore
}

// OpenResidency maps f for residency queries (f may be closed after).
// Close unmaps it.
func OpenResidency(f *os.File) (*Residency, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("residency: %w", err)
	}
	r := &Residency{pageSize: uint64(os.Getpagesize())}
	if st.Size() == 0 {
		return r, nil
	}
	r.mem, err = unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("residency: map %s: %w", f.Name(), err)
	}
	return r, nil
}

// Close unmaps the file.
func (r *Residency) Close() error {
	if r.mem == nil {
		return nil
	}
	err := unix.Munmap(r.mem)
	r.mem = nil
	return err
}

// Count returns how many pages of the runs are in the page cache, and how
// many of the runs' pages lie inside the file.
func (r *Residency) Count(runs []Run) (resident, total uint64, err error) {
	err = r.walk(runs, func(page uint64, in bool) {
		total++
		if in {
			resident++
		}
	})
	return resident, total, err
}

// Absent returns the pages of the runs (inside the file) that are not in
// the page cache, in the runs' order.
func (r *Residency) Absent(runs []Run) ([]uint64, error) {
	var out []uint64
	err := r.walk(runs, func(page uint64, in bool) {
		if !in {
			out = append(out, page)
		}
	})
	return out, err
}

// walk calls f for each page of the runs inside the file, with whether the
// page cache holds it. Run pages are in units of the host page size.
func (r *Residency) walk(runs []Run, f func(page uint64, resident bool)) error {
	filePages := uint64(len(r.mem)) / r.pageSize
	for _, run := range runs {
		if run.Page >= filePages {
			continue
		}
		n := min(run.Pages, filePages-run.Page)
		if uint64(cap(r.vec)) < n {
			r.vec = make([]byte, n)
		}
		vec := r.vec[:n]
		off := run.Page * r.pageSize
		if err := mincore(r.mem[off:off+n*r.pageSize], vec); err != nil {
			return fmt.Errorf("mincore: %w", err)
		}
		for i, v := range vec {
			f(run.Page+uint64(i), v&1 != 0)
		}
	}
	return nil
}

// mincore is mincore(2), which x/sys/unix does not wrap on Linux.
func mincore(b, vec []byte) error {
	if len(b) == 0 {
		return nil
	}
	_, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(unsafe.Pointer(&vec[0])))
	if e != 0 {
		return e
	}
	return nil
}
