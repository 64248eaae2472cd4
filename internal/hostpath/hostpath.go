package hostpath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrRefused wraps every refusal of a path (as opposed to an I/O error).
var ErrRefused = errors.New("host path refused")

// Policy says which host files a client may name.
type Policy struct {
	// DataDir is forkd's data dir: nothing inside it may be named.
	DataDir string
	// Allowed are the directories (absolute) a remote caller's files must
	// be under; empty means a remote caller may name none.
	Allowed []string
}

// forbidden are the trees of kernel interfaces that are not files: reading
// /proc/self/mem, a sysfs attribute or a device is never a VM's disk.
var forbidden = []string{"/proc", "/sys", "/dev"}

// Filesystem magic numbers (statfs f_type) of the same interfaces, in case
// they are mounted elsewhere.
const (
	procMagic  = 0x9fa0
	sysfsMagic = 0x62656572
)

// Open opens the file a client named as what ("kernel", "rootfs") for
// reading, after every check of the package doc; remote says the request
// came over the TCP listener. The caller must close the file and read (copy,
// clone) only through it.
func (p Policy) Open(what, path string, remote bool) (*os.File, error) {
	refuse := func(format string, args ...any) (*os.File, error) {
		return nil, fmt.Errorf("%w: %s %q: %s", ErrRefused, what, path, fmt.Sprintf(format, args...))
	}
	if err := p.Check(what, path, remote); err != nil {
		return nil, err
	}
	clean := filepath.Clean(path)
	fd, err := unix.Openat2(unix.AT_FDCWD, clean, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_NONBLOCK | unix.O_CLOEXEC | unix.O_NOCTTY,
		Resolve: unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if errors.Is(err, unix.ENOSYS) {
		fd, err = openNoSymlinks(clean)
	}
	switch {
	case errors.Is(err, unix.ELOOP):
		return refuse("reached through a symlink; name the file itself")
	case errors.Is(err, unix.ENOENT):
		return refuse("no such file")
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
		return refuse("not readable")
	case errors.Is(err, unix.ENXIO), errors.Is(err, unix.EWOULDBLOCK):
		return refuse("not a regular file")
	case err != nil:
		return nil, fmt.Errorf("%s %q: open: %w", what, path, err)
	}
	f := os.NewFile(uintptr(fd), clean)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s %q: fstat: %w", what, path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		f.Close()
		return refuse("not a regular file")
	}
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s %q: fstatfs: %w", what, path, err)
	}
	if sfs.Type == procMagic || sfs.Type == sysfsMagic {
		f.Close()
		return refuse("on a proc or sysfs filesystem, which holds kernel interfaces, not files")
	}
	return f, nil
}

// Check applies the checks of a path itself, before anything is opened:
// absolute, not under /proc, /sys or /dev, not in the data dir, and for a
// remote caller under one of Allowed. Open runs it first; a caller that
// hands the path to a reader of its own (an image layout directory) runs
// it alone.
func (p Policy) Check(what, path string, remote bool) error {
	refuse := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s %q: %s", ErrRefused, what, path, fmt.Sprintf(format, args...))
	}
	if !filepath.IsAbs(path) {
		return refuse("not an absolute path (a relative one would resolve against the daemon's working directory)")
	}
	clean := filepath.Clean(path)
	for _, f := range forbidden {
		if under(clean, f) {
			return refuse("under %s, which holds kernel interfaces, not files", f)
		}
	}
	if p.DataDir != "" && under(clean, filepath.Clean(p.DataDir)) {
		return refuse("inside forkd's data dir %s; give a file from elsewhere on the host", p.DataDir)
	}
	if remote {
		ok := false
		for _, d := range p.Allowed {
			if under(clean, filepath.Clean(d)) {
				ok = true
				break
			}
		}
		if !ok {
			if len(p.Allowed) == 0 {
				return refuse("over TCP no host file may be named unless host_path_dirs lists its directory (none is listed); use the Unix socket, or list the directory in host_path_dirs")
			}
			return refuse("over TCP a host file must be under one of host_path_dirs (%s)", strings.Join(p.Allowed, ", "))
		}
	}
	return nil
}

// under reports whether clean path p is dir or inside it.
func under(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

// openNoSymlinks is openat2's RESOLVE_NO_SYMLINKS for kernels before 5.6:
// it walks the path one component at a time with O_NOFOLLOW, so a symlink
// anywhere is ELOOP.
func openNoSymlinks(clean string) (int, error) {
	dir, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	defer unix.Close(dir)
	return openNoSymlinksAt(dir, strings.TrimPrefix(clean, "/"))
}

// openNoSymlinksAt opens the relative path rel below dir for reading, one
// component at a time with O_NOFOLLOW. dir stays the caller's.
func openNoSymlinksAt(dir int, rel string) (int, error) {
	parts := strings.Split(rel, "/")
	cur := dir
	for i, part := range parts {
		last := i == len(parts)-1
		flags := unix.O_PATH | unix.O_NOFOLLOW | unix.O_DIRECTORY | unix.O_CLOEXEC
		if last {
			flags = unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_NONBLOCK | unix.O_CLOEXEC | unix.O_NOCTTY
		}
		if part == ".." {
			if cur != dir {
				unix.Close(cur)
			}
			return -1, unix.EXDEV // never above where the walk started
		}
		next, err := unix.Openat(cur, part, flags, 0)
		if cur != dir {
			unix.Close(cur)
		}
		if errors.Is(err, unix.ENOTDIR) && !last {
			err = unix.ELOOP // a symlink (or a file) where a directory should be
		}
		if err != nil {
			return -1, err
		}
		cur = next
	}
	return cur, nil
}

// OpenBeneath opens path for reading only if it lies inside root and no
// component below root is a symlink (openat2 RESOLVE_BENEATH and
// RESOLVE_NO_SYMLINKS from root's fd; root itself is trusted configuration
// and may be reached through symlinks). It is for files a local API names
// that must be forkd's own (the pager's backing mem-files and recordings).
func OpenBeneath(what, root, path string) (*os.File, error) {
	clean, rel, err := beneath(what, root, path)
	if err != nil {
		return nil, err
	}
	dir, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%s %q: open %s: %w", what, path, root, err)
	}
	defer unix.Close(dir)
	return openRegularAt(what, dir, path, clean, rel)
}

// Root is a directory held open for OpenBeneath's lookups below it: a
// caller that opens several files under one root in a row (a fork opens
// its source's four) opens the root once, not once per file. The checks
// are OpenBeneath's; only the root's handle is shared.
type Root struct {
	path string
	fd   int
}

// OpenRoot opens root (trusted configuration: it may be reached through
// symlinks) for Root.Open. The caller closes it.
func OpenRoot(root string) (*Root, error) {
	fd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", root, err)
	}
	return &Root{path: root, fd: fd}, nil
}

// Open is OpenBeneath(what, r's path, path) through r's handle.
func (r *Root) Open(what, path string) (*os.File, error) {
	clean, rel, err := beneath(what, r.path, path)
	if err != nil {
		return nil, err
	}
	return openRegularAt(what, r.fd, path, clean, rel)
}

// Close closes r's handle.
func (r *Root) Close() error { return unix.Close(r.fd) }

// beneath checks that path lies textually inside root (and is not root) and
// returns it cleaned and relative to root.
func beneath(what, root, path string) (clean, rel string, err error) {
	clean = filepath.Clean(path)
	root = filepath.Clean(root)
	if !filepath.IsAbs(clean) || !under(clean, root) || clean == root {
		return "", "", fmt.Errorf("%w: %s %q: not inside %s", ErrRefused, what, path, root)
	}
	return clean, strings.TrimPrefix(clean, strings.TrimSuffix(root, "/")+"/"), nil
}

// openRegularAt opens rel below the directory dir for reading: reached
// through no symlink, and a regular file (path and clean name it in errors
// and the file).
func openRegularAt(what string, dir int, path, clean, rel string) (*os.File, error) {
	fd, err := unix.Openat2(dir, rel, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_NONBLOCK | unix.O_CLOEXEC | unix.O_NOCTTY,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if errors.Is(err, unix.ENOSYS) {
		// Kernels before 5.6: the path is textually inside root; refuse
		// symlinks below it one component at a time.
		fd, err = openNoSymlinksAt(dir, rel)
	}
	switch {
	case errors.Is(err, unix.ELOOP), errors.Is(err, unix.EXDEV):
		return nil, fmt.Errorf("%w: %s %q: reached through a symlink", ErrRefused, what, path)
	case err != nil:
		return nil, fmt.Errorf("%s %q: %w", what, path, err)
	}
	f := os.NewFile(uintptr(fd), clean)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		f.Close()
		return nil, fmt.Errorf("%w: %s %q: not a regular file", ErrRefused, what, path)
	}
	return f, nil
}

// OpenDirBeneath is OpenBeneath for a directory: path must lie inside root
// and be a directory reached through no symlink below root. A directory
// that someone else may change (a jailed VMM's own) is then used through
// the returned handle only, so a name swapped for a symlink later is never
// followed.
func OpenDirBeneath(what, root, path string) (*os.File, error) {
	clean := filepath.Clean(path)
	root = filepath.Clean(root)
	if !filepath.IsAbs(clean) || !under(clean, root) || clean == root {
		return nil, fmt.Errorf("%w: %s %q: not inside %s", ErrRefused, what, path, root)
	}
	rel := strings.TrimPrefix(clean, strings.TrimSuffix(root, "/")+"/")
	dir, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%s %q: open %s: %w", what, path, root, err)
	}
	defer unix.Close(dir)
	fd, err := unix.Openat2(dir, rel, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if errors.Is(err, unix.ENOSYS) {
		fd, err = openNoSymlinksAt(dir, rel+"/.")
	}
	switch {
	case errors.Is(err, unix.ELOOP), errors.Is(err, unix.EXDEV):
		return nil, fmt.Errorf("%w: %s %q: reached through a symlink", ErrRefused, what, path)
	case errors.Is(err, unix.ENOTDIR):
		return nil, fmt.Errorf("%w: %s %q: not a directory", ErrRefused, what, path)
	case err != nil:
		return nil, fmt.Errorf("%s %q: %w", what, path, err)
	}
	return os.NewFile(uintptr(fd), clean), nil
}

// CheckBeneath reports whether path (absolute) lies strictly inside root
// with no symlink below root: its parent directory is resolved with
// openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS) from root's fd, and its last
// component, if it exists, must not be a symlink. The file itself need not
// exist (a snapshot about to be written) and may be of any type (a socket).
func CheckBeneath(what, root, path string) error {
	clean := filepath.Clean(path)
	root = filepath.Clean(root)
	if !filepath.IsAbs(clean) || !under(clean, root) || clean == root {
		return fmt.Errorf("%w: %s %q: not inside %s", ErrRefused, what, path, root)
	}
	rel := strings.TrimPrefix(clean, strings.TrimSuffix(root, "/")+"/")
	dir, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%s %q: open %s: %w", what, path, root, err)
	}
	defer unix.Close(dir)
	parent := filepath.Dir(rel)
	pfd := dir
	if parent != "." {
		pfd, err = unix.Openat2(dir, parent, &unix.OpenHow{
			Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
		})
		if errors.Is(err, unix.ENOSYS) {
			pfd, err = openNoSymlinksAt(dir, parent) // kernels before 5.6
		}
		switch {
		case errors.Is(err, unix.ELOOP), errors.Is(err, unix.EXDEV), errors.Is(err, unix.ENOTDIR):
			return fmt.Errorf("%w: %s %q: reached through a symlink", ErrRefused, what, path)
		case err != nil:
			return fmt.Errorf("%s %q: %w", what, path, err)
		}
		defer unix.Close(pfd)
	}
	var st unix.Stat_t
	err = unix.Fstatat(pfd, filepath.Base(rel), &st, unix.AT_SYMLINK_NOFOLLOW)
	switch {
	case err == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK:
		return fmt.Errorf("%w: %s %q: is a symlink", ErrRefused, what, path)
	case err != nil && !errors.Is(err, unix.ENOENT):
		return fmt.Errorf("%s %q: %w", what, path, err)
	}
	return nil
}
