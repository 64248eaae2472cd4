package prefetch

import (
	"context"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Populate reads the runs of f into the page cache, in the runs' order,
// and returns once they are there (or ctx ends). A run the page cache
// already holds entirely is skipped, so only the first of many restores of
// one mem-file reads. Runs past the end of the file are clipped.
//
// It reads with plain reads, not posix_fadvise(WILLNEED): the kernel's
// readahead for reads fills the cache with large folios, which a VMM then
// maps many pages per fault, where WILLNEED fills it with 4 KiB ones that
// each map only their 64 KiB fault-around window (a random read of 64 MiB:
// about 280 faults against 1,030, 1.7 ms against 70 ms, here).
func Populate(ctx context.Context, f *os.File, runs []Run) (read uint64, err error) {
	res, err := OpenResidency(f)
	if err != nil {
		return 0, err
	}
	defer res.Close()
	size := uint64(len(res.mem))
	ps := res.pageSize
	var buf []byte // made at the first read: most calls find every run cached
	for _, r := range runs {
		if ctx.Err() != nil {
			return read, context.Cause(ctx)
		}
		absent, err := res.Absent([]Run{r})
		if err != nil {
			return read, err
		}
		if len(absent) == 0 {
			continue
		}
		off, end := r.Page*ps, min(r.End()*ps, size)
		if buf == nil {
			buf = make([]byte, 1<<20)
		}
		for off < end {
			n, err := f.ReadAt(buf[:min(uint64(len(buf)), end-off)], int64(off))
			if n == 0 && err != nil {
				return read, fmt.Errorf("populate %s at %d: %w", f.Name(), off, err)
			}
			off += uint64(n)
			read += uint64(n)
		}
	}
	return read, nil
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
