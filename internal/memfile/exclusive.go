package memfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
)

// unshareSuffix names the temp file EnsureExclusive writes beside path (the
// reconciler removes any *.tmp file a crash leaves).
const unshareSuffix = ".unshare.tmp"

// EnsureExclusive makes path a private inode. See Options.EnsureExclusive.
func EnsureExclusive(path string) (unshared bool, err error) {
	return Options{}.EnsureExclusive(path)
}

// EnsureExclusive is the unshare guard, run before any in-place write into a
// mem-file (invariant 3: nobody writes a shared inode). If path's link count
// is > 1 it clones path to path+".unshare.tmp", fsyncs it and renames it over
// path: path becomes a new private inode with the same bytes, while the other
// links keep the old inode, byte for byte. On a private file it does no data
// I/O and returns false. A crash at any step leaves path old or new, never
// partial; a stale temp from a crash is removed by the next call.
func (o Options) EnsureExclusive(path string) (unshared bool, err error) {
	tmp := path + unshareSuffix
	if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("unshare %s: remove stale %s: %w", path, tmp, err)
	}
	st, err := os.Stat(path)
	if err != nil {
		return false, fmt.Errorf("unshare %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return false, fmt.Errorf("unshare %s: not a regular file (%s)", path, st.Mode().Type())
	}
	if nlink(st) <= 1 {
		return false, nil
	}
	if _, err := o.cloneVia(path, path, tmp, o.copyInto); err != nil {
		return false, fmt.Errorf("unshare %s: %w", path, err)
	}
	return true, nil
}

func nlink(st fs.FileInfo) uint64 {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return uint64(s.Nlink)
	}
	return 1
}
