package memfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
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
	dir, err := os.Open(filepath.Dir(path))
	if err != nil {
		return false, fmt.Errorf("unshare %s: %w", path, err)
	}
	defer dir.Close()
	return o.EnsureExclusiveAt(dir, filepath.Base(path))
}

// EnsureExclusiveAt is EnsureExclusive of the file name in the directory
// dir has open, acting through that handle only: no name is resolved
// through a symlink (a directory someone else may change, a jailed VMM's
// own, cannot redirect it), and name must be a regular file.
func (o Options) EnsureExclusiveAt(dir *os.File, name string) (unshared bool, err error) {
	path := filepath.Join(dir.Name(), name)
	dfd := int(dir.Fd())
	tmp := name + unshareSuffix
	if err := unix.Unlinkat(dfd, tmp, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return false, fmt.Errorf("unshare %s: remove stale %s: %w", path, tmp, err)
	}
	fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, fmt.Errorf("unshare %s: %w", path, &fs.PathError{Op: "open", Path: path, Err: err})
	}
	in := os.NewFile(uintptr(fd), path)
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return false, fmt.Errorf("unshare %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return false, fmt.Errorf("unshare %s: not a regular file (%s)", path, st.Mode().Type())
	}
	if nlink(st) <= 1 {
		return false, nil
	}
	if err := o.cloneAt(in, dir, name, tmp, st); err != nil {
		return false, fmt.Errorf("unshare %s: %w", path, err)
	}
	return true, nil
}

// cloneAt fills a new inode tmp (in dir) from in (reflink, else a sparse
// copy), fsyncs it and renames it over name, then fsyncs dir. On failure tmp
// is removed and name is untouched.
func (o Options) cloneAt(in, dir *os.File, name, tmp string, st fs.FileInfo) (err error) {
	dfd := int(dir.Fd())
	fd, err := unix.Openat(dfd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, uint32(st.Mode().Perm()))
	if err != nil {
		return &fs.PathError{Op: "create", Path: filepath.Join(dir.Name(), tmp), Err: err}
	}
	out := os.NewFile(uintptr(fd), filepath.Join(dir.Name(), tmp))
	defer func() {
		if err != nil {
			out.Close()
			unix.Unlinkat(dfd, tmp, 0)
		}
	}()
	o.at(stepTempCreated)
	if _, err := o.copyInto(in, out, st.Size()); err != nil {
		return err
	}
	o.at(stepTempWritten)
	if err := out.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", out.Name(), err)
	}
	if err := out.Close(); err != nil {
		return fmt.Errorf("close %s: %w", out.Name(), err)
	}
	o.at(stepTempSynced)
	if err := unix.Renameat(dfd, tmp, dfd, name); err != nil {
		return fmt.Errorf("rename %s: %w", tmp, err)
	}
	if err := unix.Fsync(dfd); err != nil {
		return fmt.Errorf("fsync %s: %w", dir.Name(), err)
	}
	o.at(stepRenamed)
	return nil
}

func nlink(st fs.FileInfo) uint64 {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return uint64(s.Nlink)
	}
	return 1
}
