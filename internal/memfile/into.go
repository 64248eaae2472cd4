package memfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
)

// The *Into functions fill a directory that is being built under a temp name
// and will be made durable as a whole, once (atomicfile.CommitDir: fsync the
// new files, the directory, rename it, fsync its parent). They write each
// file under its final name in that directory, with no temp file of its own,
// and fsync nothing: per-file durability there would cost one log force per
// file for a directory that only becomes visible at its rename. A file whose
// Mode is ModeReflink or ModeCopy is a new inode the caller must hand to
// CommitDir to fsync; a hardlink names an inode that is already durable.

// ShareInto is ShareForFork for a file of a directory being built: the same
// hardlink, or the same fallback to a clone when linking is refused, with
// nothing fsynced. dst must not exist.
func (o Options) ShareInto(src, dst string) (ShareResult, error) {
	f, err := OpenSource(src)
	if err != nil {
		return ShareResult{}, fmt.Errorf("share %s to %s: %w", src, dst, err)
	}
	defer f.Close()
	return o.ShareFileInto(f, dst)
}

// ShareFileInto is ShareInto of a file the caller opened (and checked).
func (o Options) ShareFileInto(f *os.File, dst string) (ShareResult, error) {
	return o.shareFile(f, dst, o.CloneFileInto)
}

// CloneFileInto is CloneInto from a file the caller opened (and checked):
// the bytes come from that handle only.
func (o Options) CloneFileInto(f *os.File, dst string) (Mode, error) {
	mode, err := o.fillNewFrom(f, dst, o.copyInto)
	if err != nil {
		return "", fmt.Errorf("clone %s to %s: %w", f.Name(), dst, err)
	}
	return mode, nil
}

// CloneInto is Clone for a file of a directory being built: a new inode with
// src's bytes (FICLONE, else a sparse copy) made directly as dst, not
// fsynced. dst must not exist; on failure it is removed.
func (o Options) CloneInto(src, dst string) (Mode, error) {
	mode, err := o.fillNew(src, dst, o.copyInto)
	if err != nil {
		return "", fmt.Errorf("clone %s to %s: %w", src, dst, err)
	}
	return mode, nil
}

// CopyInto is Copy for a file of a directory being built: a physical copy
// of src's data extents made directly as dst, not fsynced.
func (o Options) CopyInto(src, dst string) error {
	physical := func(in, out *os.File, size int64) (Mode, error) {
		return ModeCopy, o.sparseCopy(in, out, size, true)
	}
	if _, err := o.fillNew(src, dst, physical); err != nil {
		return fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}
	return nil
}

// CopyFileInto is CopyInto from a file the caller opened (and checked).
func (o Options) CopyFileInto(f *os.File, dst string) error {
	physical := func(in, out *os.File, size int64) (Mode, error) {
		return ModeCopy, o.sparseCopy(in, out, size, true)
	}
	if _, err := o.fillNewFrom(f, dst, physical); err != nil {
		return fmt.Errorf("copy %s to %s: %w", f.Name(), dst, err)
	}
	return nil
}

// fillNew creates dst (O_EXCL) and fills it from src with fill.
func (o Options) fillNew(src, dst string, fill func(in, out *os.File, size int64) (Mode, error)) (_ Mode, err error) {
	in, err := OpenSource(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	return o.fillNewFrom(in, dst, fill)
}

// fillNewFrom is fillNew from an open file.
func (o Options) fillNewFrom(in *os.File, dst string, fill func(in, out *os.File, size int64) (Mode, error)) (_ Mode, err error) {
	st, err := in.Stat()
	if err != nil {
		return "", err
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("%s: not a regular file (%s)", in.Name(), st.Mode().Type())
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, st.Mode().Perm())
	if errors.Is(err, fs.ErrExist) {
		return "", fmt.Errorf("%s: %w", dst, fs.ErrExist)
	}
	if err != nil {
		return "", err
	}
	defer func() {
		if cerr := out.Close(); cerr != nil && err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(dst)
		}
	}()
	return fill(in, out, st.Size())
}
