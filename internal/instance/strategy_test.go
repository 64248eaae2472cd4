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
	if skipReason != "" {
		t.Skip("SKIP (needs forkd vmm): " + skipReason)
	}
	var xfsFS *testfs.FS // one loopback for the XFS cases, made on first use
	xfs := func(st *testing.T) string {
		if xfsFS == nil {
			xfsFS = mountXFS(st, t)
		}
		// Short: VMM sockets live under the data dir (108-byte limit).
		dir, err := os.MkdirTemp(xfsFS.Dir, "fk")
		if err != nil {
			st.Fatal(err)
		}
		return dir
	}
	noReflink := func(t *testing.T) string { return shortDir(t) } // $TMPDIR: checked below
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
				t.Skipf("SKIP (not run): %s reflinks, so a refused reflink cannot be shown there", dir)
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

// mountXFS mounts a fresh XFS loopback (reflink=1) that lives until
// owner's end; it skips t when loopback filesystems cannot be made here.
func mountXFS(t, owner *testing.T) *testfs.FS {
	t.Helper()
	if why := testfs.Unavailable(testfs.XFS); why != "" {
		t.Skip("SKIP (not run): " + why)
	}
	fs, err := testfs.Mount(testfs.XFS, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	owner.Cleanup(func() {
		if err := fs.Close(); err != nil {
			owner.Error(err)
		}
	})
	return fs
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
