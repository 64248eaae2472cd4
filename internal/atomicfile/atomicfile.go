// Package atomicfile is forkd's one helper for writes that must survive a
// crash: temp name in the same directory → write → fsync → rename → fsync the
// directory. After a crash a reader sees the old file or the new one, never a
// truncated one. Nobody else hand-rolls this sequence.
package atomicfile

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
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
// to an inode that is already durable needs none), then the directories of
// the tree (SyncTree: none on XFS), renames dir to final and fsyncs final's
// parent. After
// a crash final is absent or complete; dir (a temp name) is the caller's to
// sweep.
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
// (a journal commit, say) before the rename: it makes the tree rooted at
// dir durable as far as the rename that publishes it needs. The caller must
// publish the tree with Rename (which fsyncs the new name's parent): only
// then is the tree durable.
//
// It fsyncs files (new inodes: their data is not in any directory's log),
// then, except on XFS, every directory of the tree, the deepest first.
// POSIX makes a name durable only through an fsync of its own directory,
// and btrfs needs exactly that: its fsync logs the one directory's
// entries, and a hardlink made in a new subdirectory (a fork's mem-file,
// vmstate, kernel) is lost at a power cut after an fsync of the top alone
// (the power-loss cases of internal/reliability show it). XFS commits all
// metadata through one log, in order, and recovery replays a prefix of it:
// once the rename that publishes the tree is durable (Rename's fsync of the
// parent), every earlier change in the tree is too, so no directory of the
// tree needs an fsync of its own; each would cost a log force and a device
// cache flush. The power-loss cases on XFS prove it at every durable point
// of a fork, and their btrfs twin shows the same rule losing forks where
// the log is not in order. Symlinks are not followed.
func SyncTree(dir string, files ...string) error {
	for _, f := range files {
		if err := SyncFile(f); err != nil {
			return err
		}
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("fsync tree %s: %w", dir, err)
	}
	if st.Type == unix.XFS_SUPER_MAGIC {
		return nil // the publishing rename's fsync carries the tree (above)
	}
	return SyncDirs(dir)
}

// SyncDirs fsyncs every directory of the tree rooted at dir, the deepest
// first, dir last. Symlinks are not followed.
func SyncDirs(dir string) error {
	var dirs []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, path)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("fsync tree %s: %w", dir, err)
	}
	for i := len(dirs) - 1; i >= 0; i-- { // a parent is visited before its children
		if err := SyncDir(dirs[i]); err != nil {
			return err
		}
	}
	return nil
}

// SyncFile fsyncs a regular file.
func SyncFile(path string) error {
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
