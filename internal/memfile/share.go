package memfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

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
	res, err := o.share(src, dst, o.Clone)
	if err == nil && res.Mode == ModeHardlink {
		// Make the new name durable: the caller's journal will rely on it.
		if err := atomicfile.SyncDir(filepath.Dir(dst)); err != nil {
			return ShareResult{}, fmt.Errorf("share %s to %s: %w", src, dst, err)
		}
	}
	return res, err
}

// share links src to dst, or, when the link is refused for a reason a copy
// avoids, makes dst with clone and says why.
func (o Options) share(src, dst string, clone func(src, dst string) (Mode, error)) (ShareResult, error) {
	err := os.Link(src, dst)
	if err == nil {
		return ShareResult{Mode: ModeHardlink}, nil
	}
	var errno unix.Errno
	if !errors.As(err, &errno) || !linkFallback(errno) {
		return ShareResult{}, fmt.Errorf("share %s to %s: %w", src, dst, err)
	}
	reason := unix.ErrnoName(errno)
	mode, err := clone(src, dst)
	if err != nil {
		return ShareResult{Reason: reason}, fmt.Errorf("share %s to %s: link refused (%s): %w", src, dst, reason, err)
	}
	return ShareResult{Mode: mode, Reason: reason}, nil
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
