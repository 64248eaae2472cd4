package instance

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/store"
)

// treeOf lists every entry under dir (not following symlinks) with its type
// and, for regular files, inode, size and mtime: two equal treeOfs mean
// nothing under dir was removed, replaced or rewritten (a rename keeps all
// three).
func treeOf(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		line := rel + " " + fileKind(d.Type())
		if d.Type().IsRegular() && !strings.HasSuffix(p, ".log") {
			var st syscall.Stat_t
			if err := syscall.Lstat(p, &st); err != nil {
				return err
			}
			line += fmt.Sprintf(" ino=%d size=%d mtime=%d", st.Ino, st.Size, st.Mtim.Nano())
		}
		if d.Type()&fs.ModeSymlink != 0 {
			target, _ := os.Readlink(p)
			line += " -> " + target
		}
		out = append(out, line)
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", dir, err)
	}
	sort.Strings(out)
	return out
}

func sameTree(t *testing.T, what string, before, after []string) {
	t.Helper()
	if strings.Join(before, "\n") != strings.Join(after, "\n") {
		t.Errorf("%s changed:\nbefore:\n  %s\nafter:\n  %s", what, strings.Join(before, "\n  "), strings.Join(after, "\n  "))
	}
}

// populated makes a data dir holding a Running VM, a Standby VM and a store
// snapshot, closes its manager (the VMs keep running, as after a daemon
// stop) and returns the running VM's pid. The test's cleanup kills that VMM
// whatever the store says by then.
func populated(t *testing.T, dir string) (runningPid int) {
	t.Helper()
	openAndClose(t, dir, func(m *Manager) {
		runningPid = createRunning(t, m, "running").Pid
		createRunning(t, m, "parked")
		action(t, m, "parked", "standby")
		if _, err := m.CreateSnapshot(context.Background(), "parked", api.SnapshotRequest{Name: "snap"}); err != nil {
			t.Fatal(err)
		}
	})
	t.Cleanup(func() {
		syscall.Kill(runningPid, syscall.SIGKILL)
	})
	return runningPid
}

func newManagerErr(t *testing.T, dir string, opts ...testOpt) (*Manager, error) {
	t.Helper()
	cfg := Config{
		DataDir: dir,
		VMM:     VMMSpec{Binary: forkdBinary(t), Args: []string{"vmm"}, Emulator: true},
		Jail:    testJail(t, dir),
		Logger:  slog.New(slog.NewTextHandler(testWriter{t}, nil)),
	}
	for _, o := range opts {
		o(&cfg)
	}
	return New(context.Background(), cfg)
}

// Finding: `: > forkd.db` (or rm, or a fresh database in its place), then a
// start, made the reconciler delete every guest and snapshot directory as a
// leftover, two running VMs' among them. Now the start is refused, says what
// it found and how to proceed, and touches nothing.
func TestStartRefusesAStoreThatLostItsRecords(t *testing.T) {
	for _, tc := range []struct {
		name string
		lose func(t *testing.T, db string)
	}{
		{"removed", func(t *testing.T, db string) {
			for _, p := range []string{db, db + "-wal", db + "-shm"} {
				if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
					t.Fatal(err)
				}
			}
		}},
		{"truncated", func(t *testing.T, db string) {
			if err := os.Truncate(db, 0); err != nil {
				t.Fatal(err)
			}
		}},
		{"replaced by a new store", func(t *testing.T, db string) {
			fresh := filepath.Join(t.TempDir(), "forkd.db")
			s, err := store.Open(context.Background(), fresh)
			if err != nil {
				t.Fatal(err)
			}
			s.Close()
			if err := os.Rename(fresh, db); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortDir(t)
			pid := populated(t, dir)
			tc.lose(t, filepath.Join(dir, "forkd.db"))
			guests, snaps := treeOf(t, filepath.Join(dir, "jail")), treeOf(t, filepath.Join(dir, "snapshots"))

			m, err := newManagerErr(t, dir)
			if err == nil {
				m.Close()
				t.Fatal("New started over a store that lost its records; want ErrStoreLost")
			}
			if !errors.Is(err, ErrStoreLost) {
				t.Fatalf("New: %v; want ErrStoreLost", err)
			}
			for _, want := range []string{"forkd.db", "--orphans-to-lost-found", "lost+found", "Restore"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error does not say %q: %v", want, err)
				}
			}
			if !strings.Contains(err.Error(), "pids ["+strconv.Itoa(pid)) {
				t.Errorf("error does not name the VMM still running (pid %d): %v", pid, err)
			}
			sameTree(t, "jail/", guests, treeOf(t, filepath.Join(dir, "jail")))
			sameTree(t, "snapshots/", snaps, treeOf(t, filepath.Join(dir, "snapshots")))
			if syscall.Kill(pid, 0) != nil {
				t.Errorf("the running VM's VMM (pid %d) is gone", pid)
			}
		})
	}
}

// The twin of the refusal: --orphans-to-lost-found switches it off, and then
// the reconciler's own rule keeps everything: each directory is moved,
// whole, to lost+found, and nothing is deleted.
func TestOrphansToLostFoundSetsEverythingAside(t *testing.T) {
	dir := shortDir(t)
	pid := populated(t, dir)
	before := map[string][]string{ // dir → what it held; lost+found/<base name of dir> receives it
		"jail/forkd-vmm": treeOf(t, filepath.Join(dir, "jail", "forkd-vmm")),
		"snapshots":      treeOf(t, filepath.Join(dir, "snapshots")),
	}
	if err := os.Truncate(filepath.Join(dir, "forkd.db"), 0); err != nil {
		t.Fatal(err)
	}
	m, err := newManagerErr(t, dir, func(c *Config) { c.OrphansToLostFound = true })
	if err != nil {
		t.Fatalf("New with OrphansToLostFound: %v", err)
	}
	ctx := context.Background()
	if l, _ := m.ListInstances(ctx); len(l) != 0 {
		t.Errorf("instances after the move: %d, want 0", len(l))
	}
	for kind, tree := range before {
		if left := treeOf(t, filepath.Join(dir, kind)); len(left) != 1 {
			t.Errorf("%s/ still holds %v after the move", kind, left)
		}
		lf := map[string]string{"jail/forkd-vmm": "jail", "snapshots": "snapshots"}[kind]
		sameTree(t, kind+"/ (now in lost+found)", tree, treeOf(t, filepath.Join(dir, "lost+found", lf)))
	}
	if syscall.Kill(pid, 0) != nil {
		t.Errorf("the running VM's VMM (pid %d) was killed; moving aside must not destroy", pid)
	}
	// The data dir is usable, and a later start needs no flag.
	if _, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "fresh", MemoryMiB: testMemMiB, Start: new(bool)}); err != nil {
		t.Fatal(err)
	}
	m.Close()
	m2 := newManagerAt(t, dir)
	if _, err := m2.GetInstance(ctx, "fresh"); err != nil {
		t.Errorf("instance made after the recovery: %v", err)
	}
}
