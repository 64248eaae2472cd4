// Package datadir keeps forkd's data dir a place only forkd controls. The
// daemon runs as root and acts on everything under the data dir; whoever
// else could create, rename or replace an entry there (a data dir owned by
// another user, a world-writable parent) could plant a symlink and make root
// create, overwrite or delete files anywhere. So the data dir, every
// directory above it and every directory forkd makes under it must be owned
// by root or the daemon's uid and writable by no one else (a sticky
// directory such as /tmp excepted: others cannot rename or remove what they
// do not own there). Check refuses anything else; it never fixes a mode
// silently, since a directory others could write may already have been
// tampered with.
package datadir

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// ErrUnsafe wraps every refusal.
var ErrUnsafe = errors.New("not a directory only forkd controls")

// Check refuses dir unless it is a real directory (not a symlink) owned by
// the daemon's uid that group and others cannot write.
func Check(dir string) error {
	return check(dir, os.Geteuid(), false)
}

// CheckAncestors refuses dir (a data dir) unless every directory above it,
// after resolving symlinks, is owned by root or the daemon's uid and is
// either writable by no one else or sticky. A parent others could write
// lets them rename the data dir away and put a symlink in its place.
func CheckAncestors(dir string) error {
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return fmt.Errorf("data dir %s: %w", dir, err)
	}
	uid := os.Geteuid()
	for p := filepath.Dir(real); ; p = filepath.Dir(p) {
		if err := check(p, uid, true); err != nil {
			return fmt.Errorf("data dir %s: a directory above it: %w", dir, err)
		}
		if p == "/" || p == "." {
			return nil
		}
	}
}

func check(dir string, uid int, ancestor bool) error {
	st, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if st.Mode()&fs.ModeSymlink != 0 {
		return fmt.Errorf("%w: %s is a symlink; forkd never follows one in its data dir", ErrUnsafe, dir)
	}
	if !st.IsDir() {
		return fmt.Errorf("%w: %s is not a directory", ErrUnsafe, dir)
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("%s: no owner information", dir)
	}
	owner := int(sys.Uid)
	switch {
	case ancestor && owner != 0 && owner != uid:
		return fmt.Errorf("%w: %s is owned by uid %d, who could replace what lies below it; use a data dir whose every parent belongs to root or uid %d",
			ErrUnsafe, dir, owner, uid)
	case !ancestor && owner != uid:
		return fmt.Errorf("%w: %s is owned by uid %d, not the daemon's uid %d: its owner could plant a symlink there and make the daemon act on any file; `chown %d %s`, or use another data dir",
			ErrUnsafe, dir, owner, uid, uid, dir)
	}
	if perm := st.Mode().Perm(); perm&0o022 != 0 && !(ancestor && st.Mode()&fs.ModeSticky != 0) {
		return fmt.Errorf("%w: %s has mode %v: group or others can write it, so they could plant a symlink there; `chmod go-w %s` after checking nothing was planted",
			ErrUnsafe, dir, perm, dir)
	}
	return nil
}
