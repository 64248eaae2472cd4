package instance

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/store"
	"github.com/forkd/forkd/internal/testenv"
)

// plant makes path (and its parents) holding a file with some bytes.
func plant(t *testing.T, path string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte("someone's data\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// Finding: the reconciler removed every directory under guests/ (now
// jail/<exec>/) and
// snapshots/ that no record claimed, whatever its name and whoever made it.
// Now it deletes only what it can prove forkd made (its temp names; an id
// the journal names) and moves every other forkd-named entry to lost+found;
// names that are not forkd's are left alone. The journal-named directory is
// the twin: it shows the sweep still deletes what it can prove, so "nothing
// deleted" below is the rule at work, not a sweep that does nothing.
func TestReconcilerDeletesOnlyWhatItCanProveItMade(t *testing.T) {
	dir := shortDir(t)
	ctx := context.Background()
	var kept api.Instance
	openAndClose(t, dir, func(m *Manager) {
		var err error
		kept, err = m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "kept", MemoryMiB: testMemMiB, Start: new(bool)})
		if err != nil {
			t.Fatal(err)
		}
	})
	failedCreate := newID()
	db, err := store.Open(ctx, filepath.Join(dir, "forkd.db"))
	if err != nil {
		t.Fatal(err)
	}
	jid, _ := db.Begin(ctx, "create", failedCreate, opPayload{})
	db.Finish(ctx, jid, "failed: test")
	db.Close()

	g, s := filepath.Join(dir, "jail", "forkd-vmm"), filepath.Join(dir, "snapshots")
	strangerG, strangerS := newID(), newID()
	deleted := []string{
		filepath.Join(g, ".tmp-"+newID(), "snapshots", "snapshot-latest", "memory"),
		filepath.Join(g, ".tmp-"+newID()+".deleting", "rootfs.ext4"),
		filepath.Join(s, ".tmp-"+newID(), "memory"),
		filepath.Join(g, failedCreate, "rootfs.ext4"),        // the journal names it
		filepath.Join(g, kept.ID, "root", "rootfs.ext4.tmp"), // a temp file inside a recorded dir
	}
	movedAside := map[string]string{
		filepath.Join(g, strangerG, "kernel"): filepath.Join(dir, "lost+found", "jail", strangerG, "kernel"),
		filepath.Join(s, strangerS, "memory"): filepath.Join(dir, "lost+found", "snapshots", strangerS, "memory"),
	}
	leftAlone := []string{
		filepath.Join(g, "notes.txt"),
		filepath.Join(g, "keep-me", "data"),
		filepath.Join(g, ".tmp-not-an-id", "data"),
		filepath.Join(s, "backup-2026", "memory"),
		filepath.Join(g, kept.ID, "root", "user-file"), // inside a recorded dir, not a temp name
	}
	for _, p := range append(append(append([]string{}, deleted...), leftAlone...), keys(movedAside)...) {
		plant(t, p)
	}
	// A name already taken in lost+found: the move picks the next free one.
	plant(t, filepath.Join(dir, "lost+found", "snapshots", strangerS, "older"))
	movedAside[filepath.Join(s, strangerS, "memory")] = filepath.Join(dir, "lost+found", "snapshots", strangerS+".1", "memory")

	m := newManagerAt(t, dir)
	for _, p := range deleted {
		if exists(p) {
			t.Errorf("%s: forkd provably made it, yet it was not removed", p)
		}
	}
	for from, to := range movedAside {
		if exists(from) {
			t.Errorf("%s: no record or journal entry accounts for it, yet it was left in place", from)
		}
		if b, err := os.ReadFile(to); err != nil || string(b) != "someone's data\n" {
			t.Errorf("%s was not moved intact to %s: %q, %v", from, to, b, err)
		}
	}
	for _, p := range leftAlone {
		if b, err := os.ReadFile(p); err != nil || string(b) != "someone's data\n" {
			t.Errorf("%s is not forkd's, yet it was touched: %q, %v", p, b, err)
		}
	}
	if _, err := m.GetInstance(ctx, "kept"); err != nil {
		t.Errorf("recorded instance: %v", err)
	}
}

// usedStore gives dir a store with one record (a Created instance), so a
// start over it is not refused as a lost store.
func usedStore(t *testing.T, dir string) {
	t.Helper()
	openAndClose(t, dir, func(m *Manager) {
		if _, err := m.CreateInstance(context.Background(), api.CreateInstanceRequest{Name: "kept", MemoryMiB: testMemMiB, Start: new(bool)}); err != nil {
			t.Fatal(err)
		}
	})
}

func keys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// Finding: with `guests` (or `snapshots`, or any dir forkd makes at the top
// of its data dir) a symlink to another directory, forkd created guest dirs
// in its target, and the next start deleted the unrelated files it found
// there. Now a start over such a data dir is refused, and symlinks forkd
// finds under jail/<exec>/, snapshots/ or an old guests/ are moved aside as
// links: their targets are never touched.
func TestReconcilerNeverFollowsASymlink(t *testing.T) {
	for _, sub := range []string{"jail", "jail/forkd-vmm", "exec", "snapshots", "pager", "images", "prefetch", "guests"} {
		t.Run(sub+" is a symlink", func(t *testing.T) {
			dir := shortDir(t)
			if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, sub)), 0o700); err != nil {
				t.Fatal(err)
			}
			victim := t.TempDir()
			plant(t, filepath.Join(victim, newID(), "precious"))
			plant(t, filepath.Join(victim, ".tmp-"+newID(), "precious"))
			before := treeOf(t, victim)
			if err := os.Symlink(victim, filepath.Join(dir, sub)); err != nil {
				t.Fatal(err)
			}
			m, err := newManagerErr(t, dir)
			if err == nil {
				m.Close()
				t.Fatalf("New started with %s a symlink to %s", sub, victim)
			}
			if !strings.Contains(err.Error(), "symlink") {
				t.Errorf("error does not say what is wrong: %v", err)
			}
			sameTree(t, "the symlink's target", before, treeOf(t, victim))
		})
	}
	t.Run("entries are symlinks", func(t *testing.T) {
		dir := shortDir(t)
		usedStore(t, dir)
		victim := t.TempDir()
		plant(t, filepath.Join(victim, "precious"))
		plant(t, filepath.Join(victim, "inner.tmp"))
		before := treeOf(t, victim)
		os.MkdirAll(filepath.Join(dir, "guests"), 0o755) // the old layout's dir, migrated at start
		links := map[string]string{                      // the link → its lost+found kind
			filepath.Join(dir, "jail", "forkd-vmm", newID()):         "jail",
			filepath.Join(dir, "jail", "forkd-vmm", ".tmp-"+newID()): "jail",
			filepath.Join(dir, "snapshots", newID()):                 "snapshots",
			filepath.Join(dir, "guests", newID()):                    "guests",
			filepath.Join(dir, "guests", ".tmp-"+newID()):            "guests",
		}
		for l := range links {
			if err := os.Symlink(victim, l); err != nil {
				t.Fatal(err)
			}
		}
		newManagerAt(t, dir)
		sameTree(t, "the symlinks' target", before, treeOf(t, victim))
		for l, kind := range links {
			if exists(l) {
				t.Errorf("symlink %s left in place", l)
			}
			moved := filepath.Join(dir, "lost+found", kind, filepath.Base(l))
			if target, err := os.Readlink(moved); err != nil || target != victim {
				t.Errorf("symlink %s not moved aside as a link to %s: %q, %v", l, moved, target, err)
			}
		}
	})
}

// lost+found holds guest memory and disks like the rest of the data dir: it
// is made 0700, and only the parts that receive something.
func TestLostFoundIsPrivate(t *testing.T) {
	dir := shortDir(t)
	usedStore(t, dir)
	plant(t, filepath.Join(dir, "guests", newID(), "kernel"))
	newManagerAt(t, dir)
	for _, d := range []string{"lost+found", "lost+found/guests"} {
		st, err := os.Lstat(filepath.Join(dir, d))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o700 || !st.IsDir() {
			t.Errorf("%s: mode %v, want a 0700 directory", d, st.Mode())
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "lost+found", "snapshots")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lost+found/snapshots made with nothing to put in it: %v", err)
	}
}

// A recorded VM's directory that another uid owns, or that group or others
// can write, may hold anything planted there: the start is refused, naming
// it, rather than acting on it as root. Its twin is every other start over
// forkd's own 0755 dirs.
func TestStartRefusesAGuestDirOthersControl(t *testing.T) {
	testenv.NeedRoot(t)
	for _, tc := range []struct {
		name string
		harm func(dir string) error
		says string
	}{
		{"owned by nobody", func(d string) error { return os.Chown(d, 65534, 65534) }, "owned by uid 65534"},
		{"group-writable", func(d string) error { return os.Chmod(d, 0o775) }, "chmod go-w"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortDir(t)
			var gdir string
			openAndClose(t, dir, func(m *Manager) {
				kept, err := m.CreateInstance(context.Background(), api.CreateInstanceRequest{Name: "kept", MemoryMiB: testMemMiB, Start: new(bool)})
				if err != nil {
					t.Fatal(err)
				}
				g, _ := m.layout.Guest(kept.ID)
				gdir = filepath.Dir(g.Dir) // jail/<exec>/<id>: the entry the reconciler keeps
			})
			if err := tc.harm(gdir); err != nil {
				t.Fatal(err)
			}
			m, err := newManagerErr(t, dir)
			if err == nil {
				m.Close()
				t.Fatal("New started over a guest dir others control")
			}
			if !strings.Contains(err.Error(), gdir) || !strings.Contains(err.Error(), tc.says) {
				t.Errorf("New: %v; want it to name %s and say %q", err, gdir, tc.says)
			}
		})
	}
}
