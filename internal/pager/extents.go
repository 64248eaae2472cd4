package pager

import (
	"errors"
	"fmt"
	"os"
	"sort"

	"golang.org/x/sys/unix"
)

// extents is a sorted set of disjoint half-open ranges [start, end).
type extents []extent

type extent struct{ start, end uint64 }

// covers reports whether [start, end) lies entirely inside one extent.
func (e extents) covers(start, end uint64) bool {
	i := sort.Search(len(e), func(i int) bool { return e[i].end > start })
	return i < len(e) && e[i].start <= start && end <= e[i].end
}

// overlaps reports whether any extent intersects [start, end).
func (e extents) overlaps(start, end uint64) bool {
	i := sort.Search(len(e), func(i int) bool { return e[i].end > start })
	return i < len(e) && e[i].start < end
}

// add inserts [start, end), merging with neighbours it touches.
func (e extents) add(start, end uint64) extents {
	if start >= end {
		return e
	}
	i := sort.Search(len(e), func(i int) bool { return e[i].end >= start })
	j := i
	for j < len(e) && e[j].start <= end {
		start = min(start, e[j].start)
		end = max(end, e[j].end)
		j++
	}
	out := append(e[:i:i], extent{start, end})
	return append(out, e[j:]...)
}

// dataMap walks f with SEEK_DATA/SEEK_HOLE and returns the extents that hold
// data. A filesystem without hole support reports the whole file as data,
// which is correct, only slower.
func dataMap(f *os.File, size int64) (extents, error) {
	var data extents
	fd := int(f.Fd())
	off := int64(0)
	for off < size {
		start, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole remains
		}
		if err != nil {
			return nil, fmt.Errorf("map holes of %s: SEEK_DATA at %d: %w", f.Name(), off, err)
		}
		end, err := unix.Seek(fd, start, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("map holes of %s: SEEK_HOLE at %d: %w", f.Name(), start, err)
		}
		data = data.add(uint64(start), uint64(min(end, size)))
		off = end
	}
	return data, nil
}
