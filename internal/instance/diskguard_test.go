package instance

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/api"
)

// diskRecord is the first 16 bytes of a disk: where a guest started with
// forkd.disk_write=1 writes a record of each boot and load (the emulator's
// disk.go).
func diskRecord(t *testing.T, path string) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 16)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestForkKeepsItsDiskWhenItsSourceRuns: a fork to Standby links its
// source's sealed disk (and so does a store snapshot); the source's next
// launch gets a private copy first (the disk guard), so its guest's disk
// writes never reach the fork. The twins switch the guard off: unjailed, the
// source's VMM (root) writes the disk the fork links; jailed, the launch is
// refused (a VMM may be given only a disk with one link) and the fork
// keeps its bytes.
func TestForkKeepsItsDiskWhenItsSourceRuns(t *testing.T) {
	for _, tc := range []struct {
		name          string
		guard, jailed bool
	}{
		{"guarded/jailed", true, true},
		{"guarded/unjailed", true, false},
		{"guard off/unjailed (twin: the source writes the fork's disk)", false, false},
		{"guard off/jailed (twin: the launch is refused)", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newTestManager(t, func(c *Config) {
				c.DisableDiskGuard = !tc.guard
				if !tc.jailed {
					unjailed(c)
				}
			})
			ctx := context.Background()
			src, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "src", MemoryMiB: testMemMiB, BootArgs: testBootArgs + " forkd.disk_write=1"})
			if err != nil {
				t.Fatal(err)
			}
			action(t, m, "src", "standby")
			kid := fork(t, m, "src", api.ForkRequest{Name: "kid"})
			sn, err := m.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "snap"})
			if err != nil {
				t.Fatal(err)
			}
			gs, _ := m.layout.Guest(src.ID)
			gk, _ := m.layout.Guest(kid.ID)
			sd, _ := m.layout.Snapshot(sn.ID)
			before := fingerprint(t, gk.Rootfs())
			if !bytes.HasPrefix(diskRecord(t, gk.Rootfs()), []byte("FORKDDSK")) {
				t.Fatal("the source's guest wrote no record on its disk at boot: this test cannot see a disk write")
			}
			for what, p := range map[string]string{"source": gs.Rootfs(), "store snapshot": sd.Rootfs()} {
				if s := fingerprint(t, p); s.ino != before.ino || before.nlink < 3 {
					t.Fatalf("fork's disk inode %d (nlink %d), %s's %d: want one inode linked by the source, the fork and the store", before.ino, before.nlink, what, s.ino)
				}
			}
			// The source runs again: its guest writes a new record on its disk.
			_, err = m.Action(ctx, src.ID, "restore", api.ActionRequest{})
			after := fingerprint(t, gk.Rootfs())
			if stored := fingerprint(t, sd.Rootfs()); stored != after {
				t.Fatalf("the store snapshot's disk %+v and the fork's %+v are no longer one inode", stored, after)
			}
			switch {
			case !tc.guard && !tc.jailed:
				if err != nil {
					t.Fatalf("restore with the guard off, unjailed: %v", err)
				}
				if after.sum == before.sum {
					t.Fatal("with the disk guard off the source's guest wrote nothing into the disk its fork links: the emulator does not write its drive in place as Firecracker does, so this test cannot see what the guard prevents")
				}
				return
			case !tc.guard:
				if err == nil || !strings.Contains(err.Error(), "links") {
					t.Fatalf("with the disk guard off a jailed VMM was launched on a disk a fork links (restore: %v)", err)
				}
				if after.sum != before.sum {
					t.Fatalf("a jailed VMM wrote a sealed disk a fork links (restore: %v)", err)
				}
				t.Logf("refused as it must be: %v", err)
				return
			case err != nil:
				t.Fatalf("restore: %v", err)
			}
			if after.ino != before.ino || after.sum != before.sum || after.nlink != before.nlink-1 {
				t.Fatalf("fork's disk after its source's restore: %+v, want the same inode and bytes (%+v) with one link fewer", after, before)
			}
			srcDisk := fingerprint(t, gs.Rootfs())
			if srcDisk.ino == before.ino || srcDisk.nlink != 1 || srcDisk.sum == before.sum {
				t.Fatalf("the source's disk after its restore: %+v; want a private inode its guest wrote (the fork's: %+v)", srcDisk, before)
			}
			// The fork's own launch unshares its disk from the store's.
			action(t, m, "kid", "restore")
			verifyGuest(t, m, kid.ID)
			if k := fingerprint(t, gk.Rootfs()); k.ino == before.ino || k.nlink != 1 {
				t.Fatalf("the fork's disk after its restore: %+v; want a private inode (the store keeps %d)", k, before.ino)
			}
			if stored := fingerprint(t, sd.Rootfs()); stored.ino != before.ino || stored.sum != before.sum || stored.nlink != 1 {
				t.Fatalf("the store snapshot's disk after both launches: %+v, want the original inode and bytes alone (%+v)", stored, before)
			}
		})
	}
}
