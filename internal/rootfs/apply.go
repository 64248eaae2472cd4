package rootfs

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Whiteout names of the OCI image spec (inherited from AUFS).
const (
	whiteoutPrefix = ".wh."
	opaqueWhiteout = ".wh..wh..opq"
	// whiteoutMeta starts AUFS's own metadata names (.wh..wh.plnk and
	// friends), which carry nothing an image needs.
	whiteoutMeta = ".wh..wh."
	paxXattr     = "SCHILY.xattr."
)

// Options change how layers are applied.
type Options struct {
	// IgnoreWhiteouts drops whiteout handling: deleted files and opaque
	// directories of lower layers stay. It exists only so a test can show
	// that the content check catches a flattening that ignores whiteouts;
	// never set it elsewhere.
	IgnoreWhiteouts bool

	// unsafeFollowSymlinks resolves paths without RESOLVE_BENEATH, so a
	// symlink can lead out of the tree. Only this package's tests set it,
	// to show the escape test catches an unguarded unpack.
	unsafeFollowSymlinks bool
}

// Tree is a directory being filled with an image's layers. The caller
// owns the directory (it must be private: device nodes and setuid files
// appear in it); Close releases the tree's fd.
type Tree struct {
	root    int    // O_PATH fd of the tree's root; every path is resolved from it
	resolve uint64 // openat2 resolve flags: beneath (unless a test disarms it)
	opts    Options
	// dirTimes holds each directory's mtime from its newest header, set by
	// Finish once no later entry can change it.
	dirTimes map[string]time.Time
}

// OpenTree opens dir (an existing, empty, private directory) for Apply.
// Unpacking needs root: layers set owners and make device nodes.
func OpenTree(dir string, opts Options) (*Tree, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("unpack into %s: building a root filesystem needs root (owners and device nodes), running as uid %d", dir, os.Geteuid())
	}
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("unpack into %s: %w", dir, err)
	}
	t := &Tree{root: fd, resolve: beneath, opts: opts, dirTimes: map[string]time.Time{}}
	if opts.unsafeFollowSymlinks {
		t.resolve = unix.RESOLVE_NO_MAGICLINKS
	}
	return t, nil
}

// Close releases the tree's fd; the directory stays.
func (t *Tree) Close() error { return unix.Close(t.root) }

// LayerStats counts what one Apply did.
type LayerStats struct {
	Entries   int   // tar entries read
	Whiteouts int   // files and opaque directories whited out
	Bytes     int64 // regular file bytes written (holes excluded)
}

// Apply unpacks one uncompressed layer tar on top of what earlier layers
// left. It stops at the first entry it cannot apply safely or correctly;
// the tree is then half-applied and the caller discards it.
func (t *Tree) Apply(ctx context.Context, layer io.Reader) (LayerStats, error) {
	var st LayerStats
	// inLayer: every path this layer created, so an opaque marker removes
	// only what lower layers left (a layer may list a directory's new
	// children before its marker).
	inLayer := map[string]bool{}
	tr := tar.NewReader(layer)
	buf := make([]byte, 1<<20)
	for {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return st, nil
		}
		if err != nil {
			return st, fmt.Errorf("read layer tar: %w", err)
		}
		st.Entries++
		if err := t.entry(hdr, tr, inLayer, buf, &st); err != nil {
			return st, fmt.Errorf("entry %q: %w", hdr.Name, err)
		}
	}
}

func (t *Tree) entry(hdr *tar.Header, r io.Reader, inLayer map[string]bool, buf []byte, st *LayerStats) error {
	name, err := cleanName(hdr.Name)
	if err != nil {
		return err
	}
	dir, base := path.Split(name)
	dir = strings.TrimSuffix(dir, "/")
	if dir == "" {
		dir = "."
	}
	if strings.HasPrefix(base, whiteoutPrefix) {
		if t.opts.IgnoreWhiteouts {
			return nil
		}
		return t.whiteout(dir, base, inLayer, st)
	}
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeDir, tar.TypeSymlink, tar.TypeLink, tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
	default:
		return nil // global PAX headers and the like carry no file
	}
	if name == "." {
		if hdr.Typeflag != tar.TypeDir {
			return fmt.Errorf("the root can only be a directory, not type %q", hdr.Typeflag)
		}
		return t.meta(t.root, ".", hdr, true)
	}
	parent, err := t.mkdirAll(dir, func(p string) { inLayer[p] = true })
	if err != nil {
		return err
	}
	defer unix.Close(parent)
	inLayer[name] = true

	// Replace whatever is there, except a directory by a directory (a layer
	// re-listing a directory only changes its metadata; its contents stay).
	var old unix.Stat_t
	switch err := unix.Fstatat(parent, base, &old, unix.AT_SYMLINK_NOFOLLOW); {
	case err == nil:
		if hdr.Typeflag == tar.TypeDir && old.Mode&unix.S_IFMT == unix.S_IFDIR {
			break
		}
		if hdr.Typeflag == tar.TypeLink {
			if target, err := cleanName(hdr.Linkname); err == nil && target == name {
				return nil // a link to itself: nothing to do
			}
		}
		if err := removeAll(parent, base); err != nil {
			return fmt.Errorf("replace: %w", err)
		}
	case errors.Is(err, unix.ENOENT):
	default:
		return err
	}

	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := unix.Mkdirat(parent, base, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
			return err
		}
		t.dirTimes[name] = hdr.ModTime
		return t.metaAt(parent, base, hdr)
	case tar.TypeReg:
		n, err := t.regular(parent, base, hdr, r, buf)
		st.Bytes += n
		return err
	case tar.TypeSymlink:
		if err := unix.Symlinkat(hdr.Linkname, parent, base); err != nil {
			return err
		}
		return t.metaAt(parent, base, hdr)
	case tar.TypeLink:
		return t.hardlink(parent, base, hdr)
	default: // char, block, fifo
		mode := uint32(hdr.Mode) & 0o7777
		switch hdr.Typeflag {
		case tar.TypeChar:
			mode |= unix.S_IFCHR
		case tar.TypeBlock:
			mode |= unix.S_IFBLK
		default:
			mode |= unix.S_IFIFO
		}
		dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
		if err := unix.Mknodat(parent, base, mode, int(dev)); err != nil {
			return err
		}
		return t.metaAt(parent, base, hdr)
	}
}

// whiteout applies a ".wh." entry in directory dir.
func (t *Tree) whiteout(dir, base string, inLayer map[string]bool, st *LayerStats) error {
	if base != opaqueWhiteout && strings.HasPrefix(base, whiteoutMeta) {
		return nil
	}
	parent, err := t.openDir(dir)
	if errors.Is(err, unix.ENOENT) {
		return nil // nothing below to hide
	}
	if err != nil {
		return err
	}
	defer unix.Close(parent)
	if base != opaqueWhiteout {
		victim := strings.TrimPrefix(base, whiteoutPrefix)
		if victim == "" || victim == "." || victim == ".." {
			return fmt.Errorf("%w: whiteout of %q", ErrUnsafe, victim)
		}
		st.Whiteouts++
		return removeAll(parent, victim)
	}
	// Opaque: everything in dir that this layer did not put there goes.
	rd, err := unix.Openat(parent, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	names, err := readNames(rd)
	unix.Close(rd)
	if err != nil {
		return err
	}
	st.Whiteouts++
	for _, n := range names {
		if inLayer[path.Join(dir, n)] {
			continue
		}
		if err := removeAll(parent, n); err != nil {
			return err
		}
	}
	return nil
}

// regular writes a file's content, leaving runs of zero blocks as holes
// (tar streams carry a sparse file's holes as zeros), then its metadata.
func (t *Tree) regular(parent int, base string, hdr *tar.Header, r io.Reader, buf []byte) (int64, error) {
	fd, err := unix.Openat(parent, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return 0, err
	}
	f := os.NewFile(uintptr(fd), base)
	defer f.Close()
	var off, written int64
	for off < hdr.Size {
		n, err := io.ReadFull(r, buf[:min(int64(len(buf)), hdr.Size-off)])
		if err != nil {
			return written, fmt.Errorf("read content: %w", err)
		}
		w, err := writeSparse(f, buf[:n], off)
		written += w
		if err != nil {
			return written, err
		}
		off += int64(n)
	}
	if err := f.Truncate(hdr.Size); err != nil {
		return written, err
	}
	return written, t.meta(fd, base, hdr, false)
}

// holeBlock is the granularity at which zeros become holes.
const holeBlock = 4096

var zeroBlock = make([]byte, holeBlock)

// writeSparse writes b at off, skipping whole zero blocks (they stay holes).
func writeSparse(f *os.File, b []byte, off int64) (int64, error) {
	var written int64
	for i := 0; i < len(b); {
		j := min(i+holeBlock, len(b))
		if j-i == holeBlock && bytes.Equal(b[i:j], zeroBlock) {
			i = j
			continue
		}
		// Extend the run to the next zero block, so writes stay large.
		for j < len(b) && !(j+holeBlock <= len(b) && bytes.Equal(b[j:j+holeBlock], zeroBlock)) {
			j = min(j+holeBlock, len(b))
		}
		n, err := f.WriteAt(b[i:j], off+int64(i))
		written += int64(n)
		if err != nil {
			return written, err
		}
		i = j
	}
	return written, nil
}

// hardlink links parent/base to an existing entry of the tree (of this or a
// lower layer), resolved beneath the root like any other path.
func (t *Tree) hardlink(parent int, base string, hdr *tar.Header) error {
	target, err := cleanName(hdr.Linkname)
	if err != nil {
		return err
	}
	if target == "." {
		return fmt.Errorf("hardlink to the root directory")
	}
	tdir, tbase := path.Split(target)
	tdir = strings.TrimSuffix(tdir, "/")
	if tdir == "" {
		tdir = "."
	}
	tparent, err := t.openDir(tdir)
	if err != nil {
		return fmt.Errorf("hardlink target %q: %w", hdr.Linkname, err)
	}
	defer unix.Close(tparent)
	// flags 0: a symlink target is linked itself, never followed.
	if err := unix.Linkat(tparent, tbase, parent, base, 0); err != nil {
		return fmt.Errorf("hardlink to %q: %w", hdr.Linkname, err)
	}
	return nil
}

// metaAt applies hdr's metadata to parent/base without following it.
func (t *Tree) metaAt(parent int, base string, hdr *tar.Header) error {
	if hdr.Typeflag == tar.TypeSymlink {
		if err := unix.Fchownat(parent, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("chown: %w", err)
		}
		if err := t.xattrs(procPath(parent, base), hdr, true); err != nil {
			return err
		}
		return unix.UtimesNanoAt(parent, base, times(hdr), unix.AT_SYMLINK_NOFOLLOW)
	}
	// Directories and special files: open O_PATH|O_NOFOLLOW (never opens a
	// device) and act through /proc/self/fd, which names this inode only.
	fd, err := unix.Openat(parent, base, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return t.meta(fd, base, hdr, hdr.Typeflag != tar.TypeReg)
}

// meta sets owner, then mode (chown clears setuid/setgid), then xattrs
// (chown also drops security.capability), then mtime, on the inode of fd.
// viaProc says fd is an O_PATH fd, reached through /proc/self/fd.
func (t *Tree) meta(fd int, what string, hdr *tar.Header, viaProc bool) error {
	p := "/proc/self/fd/" + strconv.Itoa(fd)
	var err error
	if viaProc {
		err = unix.Fchownat(unix.AT_FDCWD, p, hdr.Uid, hdr.Gid, 0)
	} else {
		err = unix.Fchown(fd, hdr.Uid, hdr.Gid)
	}
	if err != nil {
		return fmt.Errorf("chown %s: %w", what, err)
	}
	mode := uint32(hdr.Mode) & 0o7777
	if viaProc {
		err = unix.Fchmodat(unix.AT_FDCWD, p, mode, 0)
	} else {
		err = unix.Fchmod(fd, mode)
	}
	if err != nil {
		return fmt.Errorf("chmod %s: %w", what, err)
	}
	if err := t.xattrs(p, hdr, false); err != nil {
		return err
	}
	return unix.UtimesNanoAt(unix.AT_FDCWD, p, times(hdr), 0)
}

// procPath names parent/base through the parent's fd, so the path is
// resolved from that directory and not re-walked from the tree's root.
func procPath(parent int, base string) string {
	return "/proc/self/fd/" + strconv.Itoa(parent) + "/" + base
}

func (t *Tree) xattrs(p string, hdr *tar.Header, noFollow bool) error {
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, paxXattr)
		if !ok {
			continue
		}
		set := unix.Setxattr
		if noFollow {
			set = unix.Lsetxattr
		}
		if err := set(p, name, []byte(v), 0); err != nil {
			return fmt.Errorf("xattr %s: %w", name, err)
		}
	}
	return nil
}

func times(hdr *tar.Header) []unix.Timespec {
	mt := timespec(hdr.ModTime)
	return []unix.Timespec{mt, mt}
}

// timespec converts a header time, clamped to what UnixNano can hold (tar
// allows years UnixNano cannot represent; such a date means nothing here).
func timespec(t time.Time) unix.Timespec {
	lo, hi := time.Unix(0, 0), time.Unix(1<<33, 0)
	if t.Before(lo) {
		t = lo
	} else if t.After(hi) {
		t = hi
	}
	return unix.NsecToTimespec(t.UnixNano())
}

// Finish sets every directory's mtime from its header, now that no later
// entry will add to it. Call it once, after the last layer.
func (t *Tree) Finish() error {
	for name, mt := range t.dirTimes {
		fd, err := t.openDir(name)
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, ErrUnsafe) {
			continue // removed or replaced by a later layer
		}
		if err != nil {
			return err
		}
		ts := timespec(mt)
		err = unix.UtimesNanoAt(unix.AT_FDCWD, "/proc/self/fd/"+strconv.Itoa(fd), []unix.Timespec{ts, ts}, 0)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("mtime of %s: %w", name, err)
		}
	}
	return nil
}
