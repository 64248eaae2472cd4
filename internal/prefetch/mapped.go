package prefetch

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ErrProcessGone is a sample of a process that has exited.
var ErrProcessGone = errors.New("process is gone")

// Sampler reads which pages of one file a process has mapped: the present
// (or swapped) entries of /proc/PID/pagemap over every mapping of the file
// in /proc/PID/maps, found by device and inode. It needs what reading
// another process's pagemap needs (same user or CAP_SYS_PTRACE); page frame
// numbers, which need more, are never read.
type Sampler struct {
	pid       int
	dev, ino  uint64
	pageSize  uint64
	filePages uint64
	pagemap   *os.File
	buf       []byte
}

// NewSampler prepares to sample process pid's mappings of the file f (by
// its device and inode: the name it was opened by may since name another).
func NewSampler(pid int, f *os.File) (*Sampler, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("sample mapped pages of %s: %w", f.Name(), err)
	}
	pm, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", pid))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("sample pid %d: %w", pid, ErrProcessGone)
		}
		return nil, fmt.Errorf("sample pid %d: %w", pid, err)
	}
	ps := uint64(os.Getpagesize())
	return &Sampler{
		pid: pid, dev: uint64(st.Dev), ino: st.Ino, pageSize: ps,
		filePages: uint64(st.Size) / ps, pagemap: pm, buf: make([]byte, 8*4096),
	}, nil
}

// Close releases the sampler.
func (s *Sampler) Close() error { return s.pagemap.Close() }

// FilePages is the file's size in pages.
func (s *Sampler) FilePages() uint64 { return s.filePages }

// mapping is one VMA of the file in the process.
type mapping struct {
	start, end uint64 // addresses
	pgoff      uint64 // file page of start
}

// mappings lists the process's VMAs that map the file.
func (s *Sampler) mappings() ([]mapping, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", s.pid))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH) {
			return nil, fmt.Errorf("sample pid %d: %w", s.pid, ErrProcessGone)
		}
		return nil, fmt.Errorf("sample pid %d: %w", s.pid, err)
	}
	defer f.Close()
	var out []mapping
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		m, ok := s.parseMapsLine(sc.Text())
		if ok {
			out = append(out, m)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("sample pid %d: read maps: %w", s.pid, err)
	}
	return out, nil
}

// parseMapsLine parses "start-end perms offset major:minor inode [path]"
// and keeps it if it maps our file.
func (s *Sampler) parseMapsLine(line string) (mapping, bool) {
	fields := strings.Fields(line)
	if len(fields) < 5 {
		return mapping{}, false
	}
	ino, err := strconv.ParseUint(fields[4], 10, 64)
	if err != nil || ino != s.ino {
		return mapping{}, false
	}
	maj, mnr, ok := strings.Cut(fields[3], ":")
	if !ok {
		return mapping{}, false
	}
	ma, err1 := strconv.ParseUint(maj, 16, 32)
	mi, err2 := strconv.ParseUint(mnr, 16, 32)
	if err1 != nil || err2 != nil || unix.Mkdev(uint32(ma), uint32(mi)) != s.dev {
		return mapping{}, false
	}
	lo, hi, ok := strings.Cut(fields[0], "-")
	if !ok {
		return mapping{}, false
	}
	start, err1 := strconv.ParseUint(lo, 16, 64)
	end, err2 := strconv.ParseUint(hi, 16, 64)
	off, err3 := strconv.ParseUint(fields[2], 16, 64)
	if err1 != nil || err2 != nil || err3 != nil || end <= start {
		return mapping{}, false
	}
	return mapping{start: start, end: end, pgoff: off / s.pageSize}, true
}

// pagemap bits (Documentation/admin-guide/mm/pagemap.rst).
const (
	pmPresent = 1 << 63
	pmSwapped = 1 << 62
)

// Sample calls visit once for each page of the file the process has in its
// page tables now (mapped from the page cache, or its private copy after a
// write). Pages mapped twice are visited twice.
func (s *Sampler) Sample(visit func(page uint64)) error {
	maps, err := s.mappings()
	if err != nil {
		return err
	}
	for _, m := range maps {
		for addr := m.start; addr < m.end; {
			n := min((m.end-addr)/s.pageSize, uint64(len(s.buf)/8))
			b := s.buf[:n*8]
			got, err := s.pagemap.ReadAt(b, int64(addr/s.pageSize*8))
			if got == 0 && err != nil {
				if errors.Is(err, io.EOF) || errors.Is(err, unix.ESRCH) {
					return fmt.Errorf("sample pid %d: %w", s.pid, ErrProcessGone)
				}
				return fmt.Errorf("sample pid %d: read pagemap: %w", s.pid, err)
			}
			for i := 0; i+8 <= got; i += 8 {
				if binary.LittleEndian.Uint64(b[i:])&(pmPresent|pmSwapped) == 0 {
					continue
				}
				page := m.pgoff + (addr-m.start)/s.pageSize + uint64(i/8)
				if page < s.filePages {
					visit(page)
				}
			}
			addr += uint64(got/8) * s.pageSize
		}
	}
	return nil
}

// RecordOptions bound a recording.
type RecordOptions struct {
	// Window is how long to record after the first sample.
	Window time.Duration
	// MaxPages ends the recording early once it holds this many pages
	// (0: no limit).
	MaxPages int
	// Interval is the first wait between samples; it grows by half each
	// sample up to MaxInterval, so the order is finest where it matters
	// most, at the start. Defaults 10 ms and 250 ms.
	Interval, MaxInterval time.Duration

	// afterSample, a test hook, runs after sample n (from 1); true ends
	// the recording there.
	afterSample func(n int) bool
}

// RecordMapped records the pages of the file f that process pid maps
// over opt.Window, in the order they appear: a page first seen in a later
// sample comes after every page seen before it (within one sample, in file
// order). It samples at once, then at growing intervals until the window
// ends, the size budget is reached or ctx ends (which discards the
// recording). key names the file's bytes in the Recording.
func RecordMapped(ctx context.Context, pid int, f *os.File, key string, opt RecordOptions) (Recording, error) {
	if opt.Interval <= 0 {
		opt.Interval = 10 * time.Millisecond
	}
	if opt.MaxInterval <= 0 {
		opt.MaxInterval = 250 * time.Millisecond
	}
	s, err := NewSampler(pid, f)
	if err != nil {
		return Recording{}, err
	}
	defer s.Close()
	rec := Recording{Key: key, PageSize: uint32(s.pageSize), FileSize: int64(s.filePages * s.pageSize),
		Source: SourceFile, Window: opt.Window, RecordedAt: time.Now()}
	seen := make([]uint64, (s.filePages+63)/64)
	full := func() bool { return opt.MaxPages > 0 && len(rec.Pages) >= opt.MaxPages }
	deadline := time.Now().Add(opt.Window)
	interval := opt.Interval
	for n := 1; ; n++ {
		var fresh []uint64
		err := s.Sample(func(p uint64) {
			if seen[p/64]&(1<<(p%64)) == 0 {
				seen[p/64] |= 1 << (p % 64)
				fresh = append(fresh, p)
			}
		})
		if err != nil {
			return Recording{}, err
		}
		// Sample visits mappings in address order; sort so one sample's
		// pages are in file order whatever the mapping layout.
		slices.Sort(fresh)
		rec.Pages = append(rec.Pages, fresh...)
		if full() {
			rec.Pages = rec.Pages[:opt.MaxPages]
			return rec, nil
		}
		if opt.afterSample != nil && opt.afterSample(n) {
			return rec, nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			return rec, nil
		}
		t := time.NewTimer(min(interval, left))
		select {
		case <-ctx.Done():
			t.Stop()
			return Recording{}, context.Cause(ctx)
		case <-t.C:
		}
		interval = min(interval*3/2, opt.MaxInterval)
	}
}
