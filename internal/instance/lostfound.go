package instance

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/forkd/forkd/internal/datadir"
)

// moveToLostFound moves the entry name of dir (guests/ or snapshots/) to
// <data>/lost+found/<guests|snapshots>/, under a free name (name, name.1,
// ...): what the reconciler cannot prove it made is set aside, never
// deleted. The rename acts on the entry itself, so a symlink moves as a
// symlink and its target is never touched. It returns where the entry went.
func (m *Manager) moveToLostFound(dir, name string) (string, error) {
	first, err := m.layout.LostFoundEntry(dir, name, 0)
	if err != nil {
		return "", err
	}
	lf := filepath.Dir(first)
	for _, d := range []string{m.layout.LostFound(), lf} {
		if err := os.Mkdir(d, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("lost+found: %w", err)
		}
		// Never move anything through a planted symlink, or into a
		// directory someone else controls.
		if err := datadir.Check(d); err != nil {
			return "", fmt.Errorf("lost+found: %w", err)
		}
	}
	src := filepath.Join(dir, name)
	for n := 0; n < 1000; n++ {
		dst, err := m.layout.LostFoundEntry(dir, name, n)
		if err != nil {
			return "", err
		}
		err = renameNoReplace(src, dst)
		if errors.Is(err, os.ErrExist) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("move %s to lost+found: %w", src, err)
		}
		if err := atomicfile.SyncDir(dir); err != nil {
			return dst, err
		}
		return dst, atomicfile.SyncDir(lf)
	}
	return "", fmt.Errorf("move %s to lost+found: %s and 999 numbered names after it are taken; clear %s", src, first, lf)
}

// renameNoReplace renames src to dst unless dst exists (os.ErrExist).
func renameNoReplace(src, dst string) error {
	err := unix.Renameat2(unix.AT_FDCWD, src, unix.AT_FDCWD, dst, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		// A filesystem without RENAME_NOREPLACE: check, then rename. Only
		// the reconciler (one per data dir, under the daemon's lock) moves
		// things here, so nothing races the check.
		if _, serr := os.Lstat(dst); serr == nil {
			return os.ErrExist
		}
		return os.Rename(src, dst)
	}
	if errors.Is(err, unix.EEXIST) {
		return os.ErrExist
	}
	if err != nil {
		return &os.LinkError{Op: "rename", Old: src, New: dst, Err: err}
	}
	return nil
}
