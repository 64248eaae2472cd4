// Package rootfstest describes file trees for tests: what a directory (an
// unpacked tree, a mounted ext4 image) holds, what a flattened image tar
// says it should hold, and the differences between the two. It also mounts
// an ext4 image read-only through a loop device, as root. Only tests import
// it.
package rootfstest

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Entry is what the tests compare of one path.
type Entry struct {
	Type   byte   // 'f' file, 'd' dir, 'l' symlink, 'c' char dev, 'b' block dev, 'p' fifo
	Perm   uint32 // permission bits with setuid, setgid and sticky
	UID    int
	GID    int
	Size   int64  // regular files
	Sum    string // sha256 of a regular file's content
	Link   string // symlink target
	Dev    uint64 // device number of a device node
	Xattrs map[string]string
	// Group names the hardlink group: every path of one inode has the
	// same Group (the lexically first of its paths); "" for one link.
	Group string
}

// Tree maps a path relative to the root ("." for the root) to its entry.
type Tree map[string]Entry

// Walk describes the tree at dir, never following symlinks.
func Walk(dir string) (Tree, error) {
	out := Tree{}
	inodes := map[uint64][]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		e := Entry{Perm: st.Mode & 0o7777, UID: int(st.Uid), GID: int(st.Gid)}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			e.Type, e.Size = 'f', st.Size
			sum, err := fileSum(p)
			if err != nil {
				return err
			}
			e.Sum = sum
			inodes[st.Ino] = append(inodes[st.Ino], rel)
		case unix.S_IFDIR:
			e.Type = 'd'
		case unix.S_IFLNK:
			e.Type = 'l'
			if e.Link, err = os.Readlink(p); err != nil {
				return err
			}
		case unix.S_IFCHR, unix.S_IFBLK:
			e.Type = 'c'
			if st.Mode&unix.S_IFMT == unix.S_IFBLK {
				e.Type = 'b'
			}
			e.Dev = st.Rdev
			inodes[st.Ino] = append(inodes[st.Ino], rel)
		case unix.S_IFIFO:
			e.Type = 'p'
			inodes[st.Ino] = append(inodes[st.Ino], rel)
		}
		if e.Xattrs, err = xattrs(p); err != nil {
			return err
		}
		out[rel] = e
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("walk %s: %w", dir, err)
	}
	for _, paths := range inodes {
		if len(paths) < 2 {
			continue
		}
		sort.Strings(paths)
		for _, p := range paths {
			e := out[p]
			e.Group = paths[0]
			out[p] = e
		}
	}
	return out, nil
}

func fileSum(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func xattrs(p string) (map[string]string, error) {
	n, err := unix.Llistxattr(p, nil)
	if err != nil || n == 0 {
		if errors.Is(err, unix.ENOTSUP) {
			err = nil
		}
		return nil, err
	}
	buf := make([]byte, n)
	if n, err = unix.Llistxattr(p, buf); err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			return nil, fmt.Errorf("xattr %s of %s: %w", name, p, err)
		}
		out[name] = string(v[:m])
	}
	return out, nil
}

// FromTar describes what a flattened image tar (one layer, no whiteouts,
// e.g. go-containerregistry's mutate.Extract) holds. Parents a tar does
// not list are directories with unknown metadata: they are left out of the
// result and Diff ignores them (ignoreUnlisted).
func FromTar(r io.Reader) (Tree, error) {
	out := Tree{}
	links := map[string][]string{} // target → hardlink names
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		name := clean(hdr.Name)
		e := Entry{Perm: uint32(hdr.Mode) & 0o7777, UID: hdr.Uid, GID: hdr.Gid}
		for k, v := range hdr.PAXRecords {
			if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
				if e.Xattrs == nil {
					e.Xattrs = map[string]string{}
				}
				e.Xattrs[x] = v
			}
		}
		switch hdr.Typeflag {
		case tar.TypeReg:
			h := sha256.New()
			n, err := io.Copy(h, tr)
			if err != nil {
				return nil, err
			}
			e.Type, e.Size, e.Sum = 'f', n, hex.EncodeToString(h.Sum(nil))
		case tar.TypeDir:
			e.Type = 'd'
		case tar.TypeSymlink:
			e.Type, e.Link, e.Perm = 'l', hdr.Linkname, 0o777 // Linux symlinks have no mode of their own
		case tar.TypeChar, tar.TypeBlock:
			e.Type = 'c'
			if hdr.Typeflag == tar.TypeBlock {
				e.Type = 'b'
			}
			e.Dev = unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
		case tar.TypeFifo:
			e.Type = 'p'
		case tar.TypeLink:
			links[clean(hdr.Linkname)] = append(links[clean(hdr.Linkname)], name)
			continue
		default:
			continue
		}
		out[name] = e
	}
	for target, names := range links {
		e, ok := out[target]
		if !ok {
			return nil, fmt.Errorf("hardlink to %q, which the tar does not hold", target)
		}
		group := append([]string{target}, names...)
		sort.Strings(group)
		e.Group = group[0]
		for _, n := range group {
			out[n] = e
		}
	}
	return out, nil
}

func clean(name string) string {
	p := path.Clean("/" + name)
	if p == "/" {
		return "."
	}
	return p[1:]
}

// Diff lists how got differs from want, one line per difference, sorted.
// Entries only in got named in ignoreExtra (e.g. "lost+found") and
// directories only in got (parents the tar did not list) are not
// differences; a difference of the root "." is reported only for the
// fields want sets.
func Diff(want, got Tree, ignoreExtra ...string) []string {
	var out []string
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			out = append(out, fmt.Sprintf("%s: missing (want %s)", p, w))
			continue
		}
		if w.Xattrs == nil {
			w.Xattrs = map[string]string{}
		}
		if g.Xattrs == nil {
			g.Xattrs = map[string]string{}
		}
		if fmt.Sprint(w) != fmt.Sprint(g) {
			out = append(out, fmt.Sprintf("%s: got %s, want %s", p, g, w))
		}
	}
	for p, g := range got {
		if _, ok := want[p]; ok {
			continue
		}
		skip := g.Type == 'd' && hasChildIn(want, p)
		for _, x := range ignoreExtra {
			if p == x || strings.HasPrefix(p, x+"/") {
				skip = true
			}
		}
		if p == "." {
			skip = true
		}
		if !skip {
			out = append(out, fmt.Sprintf("%s: unexpected %s", p, g))
		}
	}
	sort.Strings(out)
	return out
}

func hasChildIn(t Tree, dir string) bool {
	for p := range t {
		if strings.HasPrefix(p, dir+"/") {
			return true
		}
	}
	return false
}

func (e Entry) String() string {
	s := fmt.Sprintf("%c %04o %d:%d", e.Type, e.Perm, e.UID, e.GID)
	switch e.Type {
	case 'f':
		s += fmt.Sprintf(" size=%d sha256=%.12s", e.Size, e.Sum)
	case 'l':
		s += " -> " + e.Link
	case 'c', 'b':
		s += fmt.Sprintf(" dev=%d:%d", unix.Major(e.Dev), unix.Minor(e.Dev))
	}
	if len(e.Xattrs) > 0 {
		keys := make([]string, 0, len(e.Xattrs))
		for k := range e.Xattrs {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			s += fmt.Sprintf(" %s=%q", k, e.Xattrs[k])
		}
	}
	if e.Group != "" {
		s += " link-group=" + e.Group
	}
	return s
}

// MountExt4 mounts the ext4 image read-only (no journal replay) through a
// loop device mount(8) attaches with autoclear, and unmounts it, which
// frees the loop device, when the test ends. It needs root.
func MountExt4(t testing.TB, image string) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "ext4", "-o", "loop,ro,noload", image, dir).CombinedOutput(); err != nil {
		t.Fatalf("mount %s: %v: %s", image, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// Allocated is the bytes of disk a file really uses (holes excluded).
func Allocated(t testing.TB, p string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// File is one entry of a test layer.
type File struct {
	Name   string
	Type   byte // tar type flag; 0 means a regular file
	Mode   int64
	UID    int
	GID    int
	Body   string
	Zeros  int64 // regular files: this many zero bytes follow Body (a sparse file)
	Link   string
	Major  int64
	Minor  int64
	Xattrs map[string]string
}

// WriteTar writes files as one layer tar (PAX, so names, xattrs and large
// sizes need no GNU extensions), streaming the zeros of sparse files.
func WriteTar(w io.Writer, files []File) error {
	tw := tar.NewWriter(w)
	for _, f := range files {
		typ := f.Type
		if typ == 0 {
			typ = tar.TypeReg
		}
		hdr := &tar.Header{Name: f.Name, Typeflag: typ, Mode: f.Mode, Uid: f.UID, Gid: f.GID,
			Linkname: f.Link, Devmajor: f.Major, Devminor: f.Minor, Format: tar.FormatPAX,
			ModTime: time.Unix(1700000000, 0)}
		if typ == tar.TypeReg {
			hdr.Size = int64(len(f.Body)) + f.Zeros
		}
		if len(f.Xattrs) > 0 {
			hdr.PAXRecords = map[string]string{}
			for k, v := range f.Xattrs {
				hdr.PAXRecords["SCHILY.xattr."+k] = v
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if typ != tar.TypeReg {
			continue
		}
		if _, err := io.WriteString(tw, f.Body); err != nil {
			return err
		}
		if f.Zeros > 0 {
			if _, err := io.CopyN(tw, zeroReader{}, f.Zeros); err != nil {
				return err
			}
		}
	}
	return tw.Close()
}

type zeroReader struct{}

func (zeroReader) Read(b []byte) (int, error) {
	clear(b)
	return len(b), nil
}
