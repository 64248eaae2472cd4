// Package atomicfile is forkd's one helper for writes that must survive a
// crash: temp name in the same directory → write → fsync → rename → fsync the
// directory. After a crash a reader sees the old file or the new one, never a
// truncated one. Nobody else hand-rolls this sequence.
package atomicfile

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// TempSuffix is appended to a file's name while it is being written. The
// startup reconciler removes stale "*.tmp" files it finds in forkd's dirs.
const TempSuffix = ".tmp"

// WriteFile atomically replaces path with data.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	return Write(path, perm, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
}

// Write atomically replaces path with what fill writes. fill writes to a
// temp file (path + TempSuffix) which is fsynced and renamed over path; the
// directory is fsynced last. On error the temp file is removed and path is
// untouched.
func Write(path string, perm os.FileMode, fill func(w io.Writer) error) (err error) {
	tmp := path + TempSuffix
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return fmt.Errorf("atomic write %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err = fill(f); err != nil {
		return fmt.Errorf("atomic write %s: %w", path, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("atomic write %s: fsync: %w", path, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("atomic write %s: close: %w", path, err)
	}
	return Rename(tmp, path)
}

// Rename renames oldpath to newpath and fsyncs the directories involved, so
// the rename itself is durable.
func Rename(oldpath, newpath string) error {
	if err := os.Rename(oldpath, newpath); err != nil {
		return err
	}
	if err := SyncDir(filepath.Dir(newpath)); err != nil {
		return err
	}
	if od := filepath.Dir(oldpath); od != filepath.Dir(newpath) {
		return SyncDir(od)
	}
	return nil
}

// SyncDir fsyncs a directory so entries created, renamed or removed in it
// are durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync dir %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync dir %s: %w", dir, err)
	}
	return nil
}

// CommitDir is the directory form of Write: it makes a directory tree built
// under a temp name durable once and moves it to its final name. It fsyncs
// each of files (the new inodes in the tree: copies and reflinks; a hardlink
// to an inode that is already durable needs none), then dir itself, renames
// dir to final and fsyncs final's parent. After a crash final is absent or
// complete; dir (a temp name) is the caller's to sweep.
//
// One fsync of dir stands for the subdirectories built inside it. That holds
// on the filesystems forkd runs on: XFS and ext4 commit metadata through one
// log, in order, so forcing it for dir also forces every earlier change in
// the tree; btrfs logs a fsynced directory's new subdirectories with it. The
// power-loss cases of internal/reliability check it on XFS and ext4.
func CommitDir(dir, final string, files ...string) error {
	if err := SyncTree(dir, files...); err != nil {
		return fmt.Errorf("commit %s: %w", final, err)
	}
	if err := Rename(dir, final); err != nil {
		return fmt.Errorf("commit %s: %w", final, err)
	}
	return nil
}

// SyncTree is CommitDir's first half, for a caller that does other work
// (a journal commit, say) before the rename: it fsyncs files, then dir.
func SyncTree(dir string, files ...string) error {
	for _, f := range files {
		if err := syncFile(f); err != nil {
			return err
		}
	}
	return SyncDir(dir)
}

// syncFile fsyncs a regular file.
func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("fsync %s: %w", path, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", path, err)
	}
	return nil
}
