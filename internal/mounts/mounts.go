package mounts

import (
	"bufio"
	"bytes"
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
// A line longer than maxLine is left out (see withoutLongLines).
func Parse(r io.Reader) (Table, error) {
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	infos, err := mountinfo.GetMountsFromReader(bytes.NewReader(withoutLongLines(b)), nil)
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

// maxLine is the longest line the parser reads (its bufio.Scanner's
// default token size); a longer one fails the whole table.
const maxLine = bufio.MaxScanTokenSize

// withoutLongLines drops every line of a mount table longer than maxLine
// (with its newline: the parser needs room for it). The kernel writes such a line only for a mount whose
// options list hundreds of paths (an overlay filesystem of hundreds of
// layers, mounted through the new mount API): none of what forkd looks
// for (cgroup hierarchies, loop devices, the filesystem under a data dir).
// Without this, one such mount anywhere on the host made the whole table
// unreadable, and a jailed daemon refused to start.
func withoutLongLines(b []byte) []byte {
	if len(b) < maxLine {
		return b
	}
	out := make([]byte, 0, len(b))
	for len(b) > 0 {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line = b[:i+1]
		}
		b = b[len(line):]
		if len(line) < maxLine {
			out = append(out, line...)
		}
	}
	return out
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
