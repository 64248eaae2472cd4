package datadir

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/forkd/forkd/internal/testenv"
)

const nobody = 65534

// Finding: a data dir owned by `nobody` was accepted without a word; its
// owner planted `guests -> elsewhere`, and root then created and deleted
// files in the symlink's target. Now such a dir, or one group or others can
// write, or one under a parent another user owns or can write (unless
// sticky), is refused. The accepted cases are the twins.
func TestCheckRefusesDirsOthersControl(t *testing.T) {
	testenv.NeedRoot(t) // chown to another uid
	top := t.TempDir()
	mk := func(name string, mode os.FileMode, uid int) string {
		p := filepath.Join(top, name)
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, uid, -1); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ok := mk("ok", 0o700, os.Geteuid())
	okReadable := mk("ok-755", 0o755, os.Geteuid())
	foreign := mk("foreign", 0o700, nobody)
	groupW := mk("group-w", 0o770, os.Geteuid())
	otherW := mk("other-w", 0o757, os.Geteuid())
	link := filepath.Join(top, "link")
	os.Symlink(ok, link)
	for _, tc := range []struct {
		dir string
		ok  bool
	}{{ok, true}, {okReadable, true}, {foreign, false}, {groupW, false}, {otherW, false}, {link, false}} {
		err := Check(tc.dir)
		if tc.ok && err != nil {
			t.Errorf("Check(%s): %v", tc.dir, err)
		}
		if !tc.ok && !errors.Is(err, ErrUnsafe) {
			t.Errorf("Check(%s): %v; want ErrUnsafe", tc.dir, err)
		}
	}

	// Ancestors: another user's parent, or a world-writable one that is not
	// sticky, could swap the data dir for a symlink.
	for _, tc := range []struct {
		name string
		mode os.FileMode
		uid  int
		ok   bool
	}{
		{"root-or-own 0755 parent", 0o755, os.Geteuid(), true},
		{"sticky world-writable parent (like /tmp)", 0o777 | os.ModeSticky, os.Geteuid(), true},
		{"world-writable parent", 0o777, os.Geteuid(), false},
		{"parent owned by another user", 0o755, nobody, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			parent := filepath.Join(t.TempDir(), "parent")
			os.Mkdir(parent, 0o700)
			data := filepath.Join(parent, "data")
			os.Mkdir(data, 0o700)
			os.Chmod(parent, tc.mode)
			os.Chown(parent, tc.uid, -1)
			err := CheckAncestors(data)
			if tc.ok && err != nil {
				t.Errorf("CheckAncestors: %v", err)
			}
			if !tc.ok && !errors.Is(err, ErrUnsafe) {
				t.Errorf("CheckAncestors: %v; want ErrUnsafe", err)
			}
		})
	}
}
