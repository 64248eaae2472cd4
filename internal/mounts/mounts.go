package mounts

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/moby/sys/mountinfo"
)

// Self is this process's mount table. /proc/mounts lists the same mounts
// (it is /proc/self/mounts) in a format without the mount's root and with
// the mount's and the filesystem's options run together.
const Self = "/proc/self/mountinfo"

// Mount is one line of a mount table, its escapes undone.
type Mount struct {
	Point  string // where it is mounted, as this process sees the path
	FSType string // "ext4", "cgroup2", "fuse.sshfs", ...
	Source string // the device ("/dev/loop3") or what the filesystem says ("tmpfs", "none")
	// SuperOptions are the filesystem's own options, split at commas
	// ("rw", "memory" for a cgroup v1 hierarchy that holds memory).
	SuperOptions []string
}

// Table is a mount table in the kernel's order: mounts made later come
// later, and one at the same point covers the earlier.
type Table []Mount

// Read reads the mount table in path (in /proc/<pid>/mountinfo's format).
func Read(path string) (Table, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read mount table: %w", err)
	}
	defer f.Close()
	t, err := Parse(f)
	if err != nil {
		return nil, fmt.Errorf("read mount table %s: %w", path, err)
	}
	return t, nil
}

// Parse parses a mount table in mountinfo's format. A line that is not one
// (too few fields, no "-" separator) is an error: the kernel writes none.
func Parse(r io.Reader) (Table, error) {
	infos, err := mountinfo.GetMountsFromReader(r, nil)
	if err != nil {
		return nil, err
	}
	t := make(Table, 0, len(infos))
	for _, in := range infos {
		t = append(t, Mount{
			Point:        in.Mountpoint,
			FSType:       in.FSType,
			Source:       in.Source,
			SuperOptions: strings.Split(in.VFSOptions, ","),
		})
	}
	return t, nil
}

// At is the mount whose mount point is dir (the topmost, when several
// are), or false when dir is not a mount point. dir must be absolute and
// clean, as the kernel writes mount points; symlinks are not followed.
func (t Table) At(dir string) (Mount, bool) {
	for i := len(t) - 1; i >= 0; i-- {
		if t[i].Point == dir {
			return t[i], true
		}
	}
	return Mount{}, false
}

// Holding is the mount a lookup of path reaches: the one with the longest
// mount point that is path or a directory above it (the topmost of those
// at one point), or false when none is (a table without "/"). path must be
// absolute and clean, with symlinks resolved.
func (t Table) Holding(path string) (Mount, bool) {
	best := -1
	for i, m := range t {
		if !contains(m.Point, path) {
			continue
		}
		if best < 0 || len(m.Point) >= len(t[best].Point) {
			best = i
		}
	}
	if best < 0 {
		return Mount{}, false
	}
	return t[best], true
}

// contains says whether path is dir or below it.
func contains(dir, path string) bool {
	return path == dir || dir == "/" || strings.HasPrefix(path, dir+"/")
}
