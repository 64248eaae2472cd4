package memfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/forkd/forkd/internal/atomicfile"
	"golang.org/x/sys/unix"
)

// Clone makes dst a private copy of src. See Options.Clone.
func Clone(src, dst string) (Mode, error) { return Options{}.Clone(src, dst) }

// Clone makes dst a new inode with src's bytes: a FICLONE reflink where the
// filesystem can (XFS, btrfs), else a sparse copy of src's data extents. It
// writes dst+".tmp", fsyncs it and renames it over dst, so dst is either
// absent or complete. dst must not exist; a stale dst+".tmp" is replaced.
func (o Options) Clone(src, dst string) (Mode, error) {
	if _, err := os.Lstat(dst); err == nil {
		return "", fmt.Errorf("clone %s to %s: %w", src, dst, fs.ErrExist)
	}
	mode, err := o.cloneVia(src, dst, dst+atomicfile.TempSuffix, o.copyInto)
	if err != nil {
		return "", fmt.Errorf("clone %s to %s: %w", src, dst, err)
	}
	return mode, nil
}

// CloneFile is Clone from a file the caller already opened (and checked):
// the bytes come from that handle, never from a path that could have been
// swapped since. See Options.CloneFile.
func CloneFile(src *os.File, dst string) (Mode, error) { return Options{}.CloneFile(src, dst) }

// CloneFile is Clone with src an open file, read only through its handle.
func (o Options) CloneFile(src *os.File, dst string) (Mode, error) {
	if _, err := os.Lstat(dst); err == nil {
		return "", fmt.Errorf("clone %s to %s: %w", src.Name(), dst, fs.ErrExist)
	}
	mode, err := o.cloneFrom(src, dst, dst+atomicfile.TempSuffix, o.copyInto)
	if err != nil {
		return "", fmt.Errorf("clone %s to %s: %w", src.Name(), dst, err)
	}
	return mode, nil
}

// Copy makes dst a physical copy of src. See Options.Copy.
func Copy(src, dst string) error { return Options{}.Copy(src, dst) }

// Copy makes dst a new inode with its own copy of src's data extents (holes
// stay holes), never sharing a disk block with src: no FICLONE, and
// pread/pwrite rather than copy_file_range, which XFS and btrfs turn into a
// reflink. It is the per-fork full copy that benchmarks compare fanout with;
// Clone is what forkd itself uses. Like Clone, it writes dst+".tmp", fsyncs
// it and renames it over dst; dst must not exist.
func (o Options) Copy(src, dst string) error {
	if _, err := os.Lstat(dst); err == nil {
		return fmt.Errorf("copy %s to %s: %w", src, dst, fs.ErrExist)
	}
	physical := func(in, out *os.File, size int64) (Mode, error) {
		return ModeCopy, o.sparseCopy(in, out, size, true)
	}
	if _, err := o.cloneVia(src, dst, dst+atomicfile.TempSuffix, physical); err != nil {
		return fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}
	return nil
}

// cloneVia fills tmp (made fresh) from src with fill (copyInto: reflink or
// copy), fsyncs it and renames it over dst. On failure tmp is removed and dst
// is untouched.
func (o Options) cloneVia(src, dst, tmp string, fill func(in, out *os.File, size int64) (Mode, error)) (_ Mode, err error) {
	in, err := OpenSource(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	return o.cloneFrom(in, dst, tmp, fill)
}

// cloneFrom is cloneVia from an open file.
func (o Options) cloneFrom(in *os.File, dst, tmp string, fill func(in, out *os.File, size int64) (Mode, error)) (_ Mode, err error) {
	st, err := in.Stat()
	if err != nil {
		return "", err
	}
	// Never write into an existing temp: after a crash it could be anything,
	// even another link of a shared inode. Start from a new inode.
	if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("remove stale %s: %w", tmp, err)
	}
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, st.Mode().Perm())
	if err != nil {
		return "", err
	}
	defer func() {
		if err != nil {
			out.Close()
			os.Remove(tmp)
		}
	}()
	o.at(stepTempCreated)
	mode, err := fill(in, out, st.Size())
	if err != nil {
		return "", err
	}
	o.at(stepTempWritten)
	if err := out.Sync(); err != nil {
		return "", fmt.Errorf("fsync %s: %w", tmp, err)
	}
	if err := out.Close(); err != nil {
		return "", fmt.Errorf("close %s: %w", tmp, err)
	}
	o.at(stepTempSynced)
	if err := atomicfile.Rename(tmp, dst); err != nil {
		return "", fmt.Errorf("rename %s: %w", tmp, err)
	}
	o.at(stepRenamed)
	return mode, nil
}

// copyInto fills the empty file out with in's size bytes: reflink, else a
// sparse copy, else (no SEEK_HOLE) a full copy with a warning.
func (o Options) copyInto(in, out *os.File, size int64) (Mode, error) {
	err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd()))
	if err == nil {
		return ModeReflink, nil
	}
	switch {
	case errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.EXDEV), errors.Is(err, unix.EINVAL),
		errors.Is(err, unix.ENOTTY), errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EPERM):
		// No reflink here (ext4, tmpfs, across filesystems): copy.
	default:
		return "", fmt.Errorf("reflink: %w", err)
	}
	if err := o.sparseCopy(in, out, size, false); err != nil {
		return "", err
	}
	return ModeCopy, nil
}

// sparseCopy copies in's data extents into out at the same offsets and sizes
// out to size, so in's holes stay holes in out. Data is copied as is, zeros
// included. Without SEEK_HOLE it copies everything, with a warning. noCFR
// forces the pread/pwrite path (tests cover both).
func (o Options) sparseCopy(in, out *os.File, size int64, noCFR bool) error {
	// Size first, so the holes between extents stay holes and no write
	// extends the file (which would invite XFS speculative preallocation).
	if err := out.Truncate(size); err != nil {
		return fmt.Errorf("truncate: %w", err)
	}
	c := &rangeCopier{src: in, dst: out, noCFR: noCFR}
	err := dataExtents(in, size, func(off, n int64) error {
		if err := c.copy(off, n); err != nil {
			return err
		}
		o.at(stepExtentCopied)
		return nil
	})
	if errors.Is(err, errNoSeekHole) {
		o.fullCopy(in.Name(), size)
		err = c.copy(0, size)
	}
	return err
}
