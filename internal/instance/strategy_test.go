package instance

import (
	"context"
	"os"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/memfile"
	"github.com/forkd/forkd/internal/testfs"
)

// fork_strategy decides how a fork gets its mem-file, and fork_mode reports
// it: hardlink shares the source's inode; reflink and copy make a new inode
// with the same bytes; reflink on a filesystem without FICLONE fails the fork
// (and leaves nothing) instead of quietly copying.
func TestForkStrategyDecidesHowTheForkGetsItsMemFile(t *testing.T) {
	// One loopback of each kind for all cases, made on first use.
	pool := testfs.NewPool(1 << 30)
	t.Cleanup(func() {
		if err := pool.Close(); err != nil {
			t.Error(err)
		}
	})
	on := func(kind testfs.Kind) func(st *testing.T) string {
		return func(st *testing.T) string {
			// Short: VMM sockets live under the data dir (108-byte limit).
			dir, err := os.MkdirTemp(pool.Get(st, kind).Dir, "fk")
			if err != nil {
				st.Fatal(err)
			}
			st.Cleanup(func() { os.RemoveAll(dir) })
			return dir
		}
	}
	xfs := on(testfs.XFS)
	noReflink := on(testfs.Ext4) // ext4 has no FICLONE
	for _, tc := range []struct {
		name      string
		strategy  string
		dir       func(t *testing.T) string
		wantMode  string
		sameInode bool
		wantErr   string
	}{
		{"default is a hardlink", "", noReflink, api.ForkModeHardlink, true, ""},
		{"hardlink on xfs", ForkStrategyHardlink, xfs, api.ForkModeHardlink, true, ""},
		{"reflink on xfs", ForkStrategyReflink, xfs, api.ForkModeReflink, false, ""},
		{"copy on xfs", ForkStrategyCopy, xfs, api.ForkModeCopy, false, ""},
		{"copy without reflink", ForkStrategyCopy, noReflink, api.ForkModeCopy, false, ""},
		{"reflink without reflink fails", ForkStrategyReflink, noReflink, "", false, "cannot reflink"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := tc.dir(t)
			if tc.wantErr != "" && canReflink(t, dir) {
				t.Fatalf("%s reflinks: a refused reflink cannot be shown there", dir)
			}
			m := newManagerAt(t, dir, func(c *Config) { c.ForkStrategy = tc.strategy })
			src := createRunning(t, m, "src")
			action(t, m, "src", "standby")
			before := fingerprint(t, latestMem(t, m, src.ID))
			f, err := m.ForkInstance(context.Background(), "src", api.ForkRequest{Name: "f"})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("fork: err = %v, want one saying %q", err, tc.wantErr)
				}
				if list, _ := m.ListInstances(context.Background()); len(list) != 1 {
					t.Fatalf("failed fork left %d instances, want only the source", len(list))
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if f.ForkMode != tc.wantMode {
				t.Fatalf("fork_mode %q, want %q", f.ForkMode, tc.wantMode)
			}
			got := fingerprint(t, latestMem(t, m, f.ID))
			if (got.ino == before.ino) != tc.sameInode || got.sum != before.sum {
				t.Fatalf("fork mem-file inode %d (source %d), same bytes %v; want same inode = %v and same bytes",
					got.ino, before.ino, got.sum == before.sum, tc.sameInode)
			}
		})
	}
}

func TestNewRefusesAnUnknownForkStrategy(t *testing.T) {
	dir := t.TempDir()
	_, err := New(context.Background(), Config{DataDir: dir, VMM: VMMSpec{Binary: "/bin/true"}, ForkStrategy: "symlink"})
	if err == nil || !strings.Contains(err.Error(), "symlink") {
		t.Fatalf("New with fork strategy symlink: err = %v, want one naming it", err)
	}
}

// canReflink reports whether dir's filesystem accepts FICLONE.
func canReflink(t *testing.T, dir string) bool {
	t.Helper()
	a, b := dir+"/reflink-probe", dir+"/reflink-probe-clone"
	if err := os.WriteFile(a, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(a)
	defer os.Remove(b)
	mode, err := memfile.Clone(a, b)
	if err != nil {
		t.Fatal(err)
	}
	return mode == memfile.ModeReflink
}
