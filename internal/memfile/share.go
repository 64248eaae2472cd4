package memfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/forkd/forkd/internal/atomicfile"
	"golang.org/x/sys/unix"
)

// ShareForFork makes dst name src's data for a fork: a hardlink to the same
// inode, else (link refused) a Clone. See Options.ShareForFork.
func ShareForFork(src, dst string) (ShareResult, error) { return Options{}.ShareForFork(src, dst) }

// ShareForFork hardlinks src to dst. A fork's mem-file must be the same inode
// as its source's so all siblings share one page cache, and forking must not
// read or write a mem-file byte (invariant 1), so the link is the whole job.
// If the filesystem refuses the link for a reason a copy can avoid (EXDEV,
// EMLINK, EPERM, EOPNOTSUPP, ...), it falls back to Clone and returns the errno
// name in Reason for the caller to log and count. dst must not exist.
func (o Options) ShareForFork(src, dst string) (ShareResult, error) {
	f, err := OpenSource(src)
	if err != nil {
		return ShareResult{}, fmt.Errorf("share %s to %s: %w", src, dst, err)
	}
	defer f.Close()
	return o.ShareFileForFork(f, dst)
}

// ShareFileForFork is ShareForFork of a file the caller opened (and
// checked): the link names exactly that inode, never whatever a path names
// by the time it is made.
func (o Options) ShareFileForFork(f *os.File, dst string) (ShareResult, error) {
	res, err := o.shareFile(f, dst, o.CloneFile)
	if err == nil && res.Mode == ModeHardlink {
		// Make the new name durable: the caller's journal will rely on it.
		if err := atomicfile.SyncDir(filepath.Dir(dst)); err != nil {
			return ShareResult{}, fmt.Errorf("share %s to %s: %w", f.Name(), dst, err)
		}
	}
	return res, err
}

// OpenSource opens a file to share or clone: read-only, never through a
// symlink in its last component, and only a regular file.
func OpenSource(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if errors.Is(err, unix.ELOOP) {
		return nil, fmt.Errorf("%s is a symlink: never followed", path)
	}
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err == nil && !st.Mode().IsRegular() {
		err = fmt.Errorf("%s: not a regular file (%s)", path, st.Mode().Type())
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// shareFile links the inode f has open to dst, or, when the link is refused
// for a reason a copy avoids, makes dst with clone from f and says why.
func (o Options) shareFile(f *os.File, dst string, clone func(f *os.File, dst string) (Mode, error)) (ShareResult, error) {
	err := linkFile(f, dst)
	if err == nil {
		return ShareResult{Mode: ModeHardlink}, nil
	}
	var errno unix.Errno
	if !errors.As(err, &errno) || !linkFallback(errno) {
		return ShareResult{}, fmt.Errorf("share %s to %s: %w", f.Name(), dst, err)
	}
	reason := unix.ErrnoName(errno)
	mode, err := clone(f, dst)
	if err != nil {
		return ShareResult{Reason: reason}, fmt.Errorf("share %s to %s: link refused (%s): %w", f.Name(), dst, reason, err)
	}
	return ShareResult{Mode: mode, Reason: reason}, nil
}

// linkFile gives the inode f has open a new name, dst: linkat of the
// descriptor's /proc/self/fd link with AT_SYMLINK_FOLLOW, which names the
// open inode itself (unlike AT_EMPTY_PATH it needs no CAP_DAC_READ_SEARCH).
func linkFile(f *os.File, dst string) error {
	err := unix.Linkat(unix.AT_FDCWD, "/proc/self/fd/"+strconv.Itoa(int(f.Fd())), unix.AT_FDCWD, dst, unix.AT_SYMLINK_FOLLOW)
	if err != nil {
		return &os.LinkError{Op: "link", Old: f.Name(), New: dst, Err: err}
	}
	return nil
}

// LinkFileAt gives the inode f has open the name name in the directory dir
// has open (no path resolved: a directory someone else may change cannot
// redirect it), and fsyncs dir. An existing name is fs.ErrExist.
func LinkFileAt(f, dir *os.File, name string) error {
	err := unix.Linkat(unix.AT_FDCWD, "/proc/self/fd/"+strconv.Itoa(int(f.Fd())), int(dir.Fd()), name, unix.AT_SYMLINK_FOLLOW)
	if err != nil {
		return &os.LinkError{Op: "link", Old: f.Name(), New: dir.Name() + "/" + name, Err: err}
	}
	return dir.Sync()
}

// linkFallback reports whether a link error is one a copy can get around.
// Errors a copy would hit too (ENOENT, EEXIST, ENOSPC, EACCES on the
// directory) are returned to the caller instead.
func linkFallback(errno unix.Errno) bool {
	switch errno {
	case unix.EXDEV, unix.EMLINK, unix.EPERM, unix.EOPNOTSUPP, unix.ENOSYS, unix.EINVAL:
		return true
	}
	return false
}
