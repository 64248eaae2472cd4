package reliability

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/instance"
	"github.com/forkd/forkd/internal/loopfs"
	"github.com/forkd/forkd/internal/network/nettest"
	"github.com/forkd/forkd/internal/testenv"
	"github.com/forkd/forkd/internal/testfs"
)

// Power-loss cases. A SIGKILL never loses the page cache, so the crash cases
// cannot tell whether a write was ever made durable: a missing fsync passes
// them all. These cut the power instead. The filesystem holding the data dir
// is shut down without flushing its log (the GOINGDOWN ioctl with NOLOGFLUSH,
// which is what `xfs_io -x -c shutdown` does; XFS and ext4 both answer it):
// from that instant nothing reaches the disk, so whatever was not yet forced
// to the log or written back is lost, as in a power cut. btrfs has no such
// ioctl: its image lives on an XFS filesystem of its own and the cut is an
// atomic reflink of the image (powerFS). The filesystem is then unmounted
// and mounted again (log recovery) and a daemon starts on it.
//
// A fork acknowledged before the cut must come back complete: Standby, its
// mem-file, vmstate, kernel and disk byte-identical to its source's, and
// restorable with its memory intact. A fork in flight at the cut must come
// back complete or not at all, leaving nothing behind.

const (
	// fsGoingDown is XFS_IOC_GOINGDOWN, _IOR('X', 125, __u32); ext4's
	// EXT4_IOC_SHUTDOWN is the same request.
	fsGoingDown = 0x8004587d
	// fsGoingDownNoLogFlush: flush neither the log nor data
	// (XFS_FSOP_GOING_FLAGS_NOLOGFLUSH, EXT4_GOING_FLAGS_NOLOGFLUSH).
	fsGoingDownNoLogFlush = 2
)

// powerFS is a loopback filesystem whose power a case can cut.
type powerFS struct {
	*testfs.FS
	// byClone: the filesystem has no shutdown ioctl (btrfs), so the cut is
	// an atomic reflink of its image (on an XFS filesystem of its own),
	// taken while everything above keeps running: the clone holds exactly
	// what had reached the device at that instant, and power comes back on
	// the clone. XFS's reflink waits for the direct I/O in flight to the
	// image and holds off new I/O meanwhile, so no write is torn.
	byClone bool
}

// cut cuts the power: from this instant nothing more reaches the disk.
func (fs *powerFS) cut() error {
	if fs.byClone {
		return cloneFile(fs.Image, fs.Image+".cut")
	}
	return cutPower(fs.FS)
}

// on brings the power back: the filesystem is unmounted and mounted again
// from what its disk held at the cut (log recovery).
func (fs *powerFS) on() error {
	if !fs.byClone {
		return powerOn(fs.FS)
	}
	var err error
	for range 50 { // the killed daemon's files close asynchronously
		if err = fs.Unmount(); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("power on: %w", err)
	}
	if err := os.Rename(fs.Image+".cut", fs.Image); err != nil {
		return fmt.Errorf("power on: %w", err)
	}
	return fs.Attach()
}

// cloneFile reflinks src to a new file dst (FICLONE): one atomic copy.
func cloneFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("cut power: %w", err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("cut power: %w", err)
	}
	defer out.Close()
	if err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); err != nil {
		return fmt.Errorf("cut power: clone %s: %w", src, err)
	}
	return nil
}

// cutPower shuts fs down as a power cut would leave it: the log is not
// flushed, dirty data is never written.
func cutPower(fs *testfs.FS) error {
	f, err := os.Open(fs.Dir)
	if err != nil {
		return fmt.Errorf("cut power: %w", err)
	}
	defer f.Close()
	if err := unix.IoctlSetPointerInt(int(f.Fd()), fsGoingDown, fsGoingDownNoLogFlush); err != nil {
		return fmt.Errorf("cut power: shutdown %s: %w", fs.Dir, err)
	}
	return nil
}

// powerOn unmounts the shut-down filesystem and mounts it again, which
// replays its log: what the disk held at the cut is what the daemon finds.
func powerOn(fs *testfs.FS) error {
	var err error
	for range 50 { // the killed daemon's files close asynchronously
		if err = exec2("umount", fs.Dir); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("power on: %w", err)
	}
	// Our umount drops our mount, not the superblock: a mount namespace
	// made meanwhile (a jailer's, anywhere on the machine, holds a copy of
	// every mount until it pivots away from them) keeps the shut-down
	// filesystem alive, and a mount now would get that one back. Wait for
	// the superblock to go (its /sys/fs/<kind>/<device> entry with it).
	sb := filepath.Join("/sys/fs", string(fs.Kind), filepath.Base(fs.Device))
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(sb); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("power on: %s still alive a minute after its umount (another mount namespace holds it)", sb)
		}
	}
	return exec2("mount", "-t", string(fs.Kind), fs.Device, fs.Dir)
}

// frozen reports whether pid is stopped (the FreezeAtEnv hook fired).
func frozen(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) S ...: the state follows the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] == 'T'
}

// powerCase is one power cut during or after forks.
type powerCase struct {
	name string
	// at is the FreezeAtEnv point the daemon stops at, where the power is
	// cut; "" cuts it once every fork was acknowledged, with nothing in
	// flight.
	at string
	// forks are made concurrently (at != "") or one after another.
	forks        int
	fromSnapshot bool
	// survive is how many forks must come back (at least); acknowledged
	// forks always must. lost, when set, says none may.
	survive int
	lost    bool
	// restandby (with at == ""): between the first fork and the next, the
	// source is restored, runs and stands by again, so its VMM writes a new
	// vmstate and a Diff inside the cut's window. A fork that links the
	// vmstate fsyncs nothing of it: the source's standby must have made it
	// durable, and the first fork must keep the old one.
	restandby bool
	// env is extra daemon environment for the forks, afterEnv for the
	// daemon that starts after the cut (a twin's switch).
	env, afterEnv []string
	// net runs the case on a networked daemon (every VM networked, a warm
	// pool of warm networks) in a network namespace of the test's own: a
	// networked fork that takes a warm network commits unsynced, as any
	// fork, its directory's record holding its slot; one that makes its
	// own network journals that with a synced commit.
	net  bool
	warm int
	// batch: the forks are one fork batch (kid-1..kid-N, all or none), one
	// call to the daemon; acknowledged means that call returned them.
	batch bool
}

func powerCases() []powerCase {
	// A batch: three concurrent forks whose commits share one store group.
	batch := []string{instance.GroupMinEnv + "=3"}
	return []powerCase{
		{name: "acknowledged", forks: 3, survive: 3},
		{name: "acknowledged/from-snapshot", forks: 3, survive: 3, fromSnapshot: true},
		{name: "acknowledged/source-stands-by-again", forks: 2, survive: 2, restandby: true},
		// A data dir whose filesystem keeps no directory records: the
		// fork's first commit is synced and only its last is not.
		{name: "acknowledged/no-dir-records", forks: 3, survive: 3, env: []string{instance.NoDirRecordsEnv + "=1"}},
		{name: "fork:files/no-dir-records", at: "fork:files", forks: 2, env: []string{instance.NoDirRecordsEnv + "=1"}},
		// Networked forks: with more warm networks than forks, each takes
		// one in its unsynced first commit; with none, each makes its own
		// network and journals that with a synced commit.
		{name: "acknowledged/networked", forks: 3, survive: 3, net: true, warm: 4},
		{name: "acknowledged/networked-no-warm-pool", forks: 2, survive: 2, net: true},
		{name: "fork:files/networked", at: "fork:files", forks: 2, net: true, warm: 4},
		// Only a fork of two commits reaches begun and beginning: a fork
		// with no network whose dir carries its record makes one commit,
		// after its rename.
		{name: "fork:begun/no-dir-records", at: "fork:begun", forks: 2, env: []string{instance.NoDirRecordsEnv + "=1"}},
		{name: "fork:files", at: "fork:files", forks: 2},
		{name: "fork:committed", at: "fork:committed", forks: 2, survive: 1},
		{name: "fork:committed/from-snapshot", at: "fork:committed", forks: 2, survive: 1, fromSnapshot: true},
		{name: "fork:beginning/batch-of-3-no-dir-records", at: "fork:beginning", forks: 3, lost: true, env: slices.Concat(batch, []string{instance.NoDirRecordsEnv + "=1"})},
		// The last commit does not wait for an fsync: a cut loses it, and
		// the reconciler completes the forks from their journal entries and
		// their dirs in place.
		{name: "fork:committing/batch-of-3", at: "fork:committing", forks: 3, survive: 3, env: batch},
		{name: "fork:committed/batch-of-3", at: "fork:committed", forks: 3, survive: 3, env: batch},
		// A fork batch (one call): its durable points are its first commit
		// and the fsync of its renames. A cut before that fsync (one dir
		// renamed, the log not forced) loses every fork; after it, the
		// reconciler completes every one from the first commit, whether
		// the last commit, not synced, survived the cut or not.
		{name: "acknowledged/fork-batch-of-4", forks: 4, survive: 4, batch: true},
		{name: "acknowledged/fork-batch-of-4-from-snapshot", forks: 4, survive: 4, batch: true, fromSnapshot: true},
		{name: "fork:batch-renaming/fork-batch-of-4", at: "fork:batch-renaming", forks: 4, lost: true, batch: true},
		{name: "fork:batch-files/fork-batch-of-4", at: "fork:batch-files", forks: 4, survive: 4, batch: true},
		{name: "fork:batch-committing/fork-batch-of-4", at: "fork:batch-committing", forks: 4, survive: 4, batch: true},
		{name: "fork:batch-committed/fork-batch-of-4", at: "fork:batch-committed", forks: 4, survive: 4, batch: true},
	}
}

// TestPowerLossKeepsAcknowledgedForks cuts the power after acknowledged
// forks and at each durable point of forks in flight, on XFS, ext4 and
// btrfs (its fsync logs one directory's entries, not a tree's), and
// requires every acknowledged fork complete and every other one complete or
// cleanly gone. A fork links every file of a Standby source or a store
// snapshot; with the source restored inside the cut's window, the disk
// guard's private copy (a reflink on XFS and btrfs, a copy on ext4) must
// hold what the source's guest wrote, and the fork the old bytes.
func TestPowerLossKeepsAcknowledgedForks(t *testing.T) {
	for _, kind := range []testfs.Kind{testfs.XFS, testfs.Ext4, testfs.Btrfs} {
		for _, pc := range powerCases() {
			t.Run(string(kind)+"/"+pc.name, func(t *testing.T) {
				t.Parallel()
				res := runPowerCase(t, kind, pc)
				for _, e := range res.violations {
					t.Error(e)
				}
			})
		}
	}
}

// powerResult is what a power case found after the power came back.
type powerResult struct {
	violations []string // what a correct forkd must never show
}

// mountForPowerLoss makes a loopback filesystem of kind for one case. A
// btrfs one (no shutdown ioctl) has its image on an XFS filesystem of its
// own, so its power is cut by reflinking the image.
func mountForPowerLoss(t *testing.T, kind testfs.Kind) *powerFS {
	t.Helper()
	if kind != testfs.Btrfs {
		return &powerFS{FS: testfs.Mount(t, kind, 1<<30)}
	}
	testfs.Need(t, kind)
	shelf := testfs.Mount(t, testfs.XFS, 2<<30)
	fs, err := loopfs.MountIn(shelf.Dir, kind, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := fs.Close(); err != nil {
			t.Error(err)
		}
	})
	return &powerFS{FS: &testfs.FS{FS: fs}, byClone: true}
}

// randomDisk writes a disk image of random bytes outside any data dir: a
// fork's disk copy then has data whose loss shows.
func randomDisk(t *testing.T) string {
	t.Helper()
	b := make([]byte, 4<<20)
	rand.Read(b)
	p := filepath.Join(t.TempDir(), "rootfs.ext4")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// forkFiles are the files a fork takes from its source, by what they are:
// its mem-file, vmstate, kernel and disk.
func forkFiles(snap guestdir.SnapDir, kernel, rootfs string) map[string]string {
	return map[string]string{"memory": snap.Memory(), "vmstate": snap.VMState(), "kernel": kernel, "rootfs": rootfs}
}

// sums hashes each file of files.
func sums(t *testing.T, files map[string]string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for what, path := range files {
		out[what] = fileSum(t, path)
	}
	return out
}

// exec2 runs a command and returns its error with its output.
func exec2(name string, args ...string) error {
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// syncFS makes everything written to the filesystem holding dir durable
// (syncfs: this filesystem only).
func syncFS(t *testing.T, dir string) {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
}

func runPowerCase(t *testing.T, kind testfs.Kind, pc powerCase) powerResult {
	fs := mountForPowerLoss(t, kind)
	d := newDaemonSpec(t, fs.Dir, func(o *DaemonOptions) {
		if pc.net {
			o.NetNS = nettest.Namespace(t)
			o.Args = append(o.Args, netArgs(pc.warm)...)
		}
	})
	ctx := ctxT(t, 3*time.Minute)
	// The source's guest writes its disk at every boot and restore
	// (forkd.disk_write): a fork links the disk, and the disk guard gives
	// the source a private copy at its next launch.
	src, err := d.Client.CreateInstance(ctx, api.CreateInstanceRequest{Name: "src", MemoryMiB: testMemMiB, BootArgs: testBootArgs + " forkd.disk_write=1", Rootfs: randomDisk(t)})
	if err != nil {
		t.Fatal(err)
	}
	action(t, d.Client, "src", "standby")
	g, _ := d.Layout.Guest(src.ID)
	want := sums(t, forkFiles(g.Latest(), g.Kernel(), g.Rootfs()))
	fork := func(ctx context.Context, c *api.Client, name string) error {
		_, err := c.ForkInstance(ctx, "src", api.ForkRequest{Name: name})
		return err
	}
	if pc.fromSnapshot {
		sn, err := d.Client.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "snap"})
		if err != nil {
			t.Fatal(err)
		}
		sd, _ := d.Layout.Snapshot(sn.ID)
		want = sums(t, forkFiles(sd, sd.Kernel(), sd.Rootfs()))
		fork = func(ctx context.Context, c *api.Client, name string) error {
			_, err := c.ForkSnapshot(ctx, "snap", api.ForkRequest{Name: name})
			return err
		}
	}
	// Whatever setup wrote is durable before the case starts: the cut must
	// only judge the forks.
	syncFS(t, fs.Dir)

	env := append([]string{}, pc.env...)
	if pc.at != "" {
		env = append(env, instance.FreezeAtEnv+"="+pc.at)
	}
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	names := make([]string, pc.forks)
	acked := make([]bool, pc.forks)
	wantOf := map[string]map[string]string{} // each fork's files, by name
	for i := range names {
		names[i] = fmt.Sprintf("kid%d", i)
		if pc.batch {
			names[i] = fmt.Sprintf("kid-%d", i+1)
		}
		wantOf[names[i]] = want
	}
	var srcWant map[string]string // the source's second snapshot (restandby)
	var stored guestdir.SnapDir   // a store snapshot of it, made inside the cut's window
	d = restart(t, d, env)
	batchFrom := "instance"
	if pc.fromSnapshot {
		batchFrom = "snapshot"
	}
	switch {
	case pc.batch && pc.at == "":
		if err := forkBatchOf(batchFrom, pc.forks)(ctx, d.Client); err != nil {
			t.Fatalf("fork batch: %v", err)
		}
		for i := range acked {
			acked[i] = true
		}
	case pc.at == "":
		for i, n := range names {
			if pc.restandby && i == 1 {
				action(t, d.Client, "src", "restore")
				waitGuestWork(t, d, "src", 64)
				action(t, d.Client, "src", "standby")
				srcWant = sums(t, forkFiles(g.Latest(), g.Kernel(), g.Rootfs()))
				if srcWant["vmstate"] == want["vmstate"] || srcWant["memory"] == want["memory"] || srcWant["rootfs"] == want["rootfs"] {
					t.Fatal("the source's restore and second standby wrote the same vmstate, mem-file or disk as before: the case would show nothing")
				}
				// The store links the sealed vmstate, mem-file and disk too.
				sn, err := d.Client.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "snap2"})
				if err != nil {
					t.Fatal(err)
				}
				stored, _ = d.Layout.Snapshot(sn.ID)
			}
			if srcWant != nil {
				wantOf[n] = srcWant
			}
			if err := fork(ctx, d.Client, n); err != nil {
				t.Fatalf("fork %s: %v", n, err)
			}
			acked[i] = true
		}
	default:
		fctx, cancel := context.WithCancel(ctx)
		defer cancel()
		var wg sync.WaitGroup
		if pc.batch {
			wg.Go(func() {
				ok := forkBatchOf(batchFrom, pc.forks)(fctx, d.Client) == nil
				for i := range acked {
					acked[i] = ok
				}
			})
		} else {
			for i, n := range names {
				wg.Go(func() { acked[i] = fork(fctx, d.Client, n) == nil })
			}
		}
		deadline := time.Now().Add(90 * time.Second)
		for !frozen(d.Pid()) {
			select {
			case <-d.Exited():
				t.Fatalf("the daemon exited before reaching %s:%s", pc.at, d.LogTail())
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("the daemon never reached %s (is it still a crash point?)%s", pc.at, d.LogTail())
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err := fs.cut(); err != nil {
			t.Fatal(err)
		}
		syscall.Kill(d.Pid(), syscall.SIGKILL)
		cancel()
		wg.Wait()
	}
	if pc.at == "" {
		if err := fs.cut(); err != nil {
			t.Fatal(err)
		}
		syscall.Kill(d.Pid(), syscall.SIGKILL)
	}
	if _, err := d.WaitExit(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	addFigure("power_cuts", 1)
	if err := fs.on(); err != nil {
		t.Fatal(err)
	}
	d = restart(t, d, pc.afterEnv)

	var res powerResult
	bad := func(format string, args ...any) {
		res.violations = append(res.violations, fmt.Sprintf(format, args...))
	}
	survived := 0
	for i, n := range names {
		in, err := d.Client.GetInstance(ctxT(t, 10*time.Second), n)
		if err != nil {
			if acked[i] {
				bad("fork %s was acknowledged before the power cut and is gone: %v", n, err)
			}
			continue
		}
		survived++
		if in.State != api.StateStandby {
			bad("fork %s came back %s (error %q), want Standby", n, in.State, in.Error)
			continue
		}
		fg, _ := d.Layout.Guest(in.ID)
		for what, path := range forkFiles(fg.Latest(), fg.Kernel(), fg.Rootfs()) {
			if _, err := os.Stat(path); err != nil {
				bad("fork %s: %s: %v", n, what, err)
			} else if sum := fileSum(t, path); sum != wantOf[n][what] {
				bad("fork %s: %s %s does not hold its source's bytes", n, what, path)
			} else {
				st, _ := os.Stat(path)
				addFigure("fork_bytes_verified_after_power_cut", st.Size())
			}
		}
	}
	if srcWant != nil {
		// The source's acknowledged restore and standby: the disk guard's
		// private copy its guest wrote, the vmstate its VMM wrote under a
		// fresh name and the Diff into its private mem-file.
		for _, what := range []string{"memory", "vmstate", "rootfs"} {
			if sum := fileSum(t, forkFiles(g.Latest(), "", g.Rootfs())[what]); sum != srcWant[what] {
				bad("source: %s does not hold what its acknowledged restore and standby wrote", what)
			}
			if _, err := d.Client.GetSnapshot(ctxT(t, 10*time.Second), "snap2"); err != nil {
				bad("store snapshot snap2 was acknowledged before the power cut and is gone: %v", err)
			} else if sum := fileSum(t, forkFiles(stored, "", stored.Rootfs())[what]); sum != srcWant[what] {
				bad("store snapshot snap2: %s does not hold its source's bytes", what)
			}
		}
	}
	if survived < pc.survive {
		bad("%d of %d forks came back, want at least %d", survived, pc.forks, pc.survive)
	}
	if pc.batch && survived != 0 && survived != pc.forks {
		bad("%d of the %d forks of one batch came back: a batch is all or none", survived, pc.forks)
	}
	if pc.lost && survived > 0 {
		bad("%d of %d forks came back from a group cut before its commit, want none", survived, pc.forks)
	}
	if err := WaitSettled(ctx, d.Client, 30*time.Second); err != nil {
		bad("settle: %v", err)
	}
	if err := CheckInvariants(ctx, d); err != nil {
		bad("invariants violated:\n%v", err)
	}
	if len(res.violations) > 0 {
		return res
	}
	if _, err := Exercise(ctxT(t, 90*time.Second), d.Client); err != nil {
		bad("after the power cut, not everything is operable:\n%v", err)
	}
	return res
}

// TestPowerLossCatchesAnUnsyncedBatchCommit is the twin of the fork
// batch's roll-forward: its last commit is not synced, so with the
// reconciler's roll-forward switched off
// (instance.UnsafeNoForkRollForwardEnv, after the cut), the power cut right
// after an acknowledged batch loses that commit and the reconciler removes
// every fork of it: the harness must report the acknowledged forks gone.
func TestPowerLossCatchesAnUnsyncedBatchCommit(t *testing.T) {
	testenv.NeedRoot(t)
	t.Parallel()
	res := runPowerCase(t, testfs.XFS, powerCase{name: "acknowledged/fork-batch-of-4", forks: 4, survive: 4, batch: true,
		afterEnv: []string{instance.UnsafeNoForkRollForwardEnv + "=1"}})
	requireLostAcknowledged(t, res, "the batch's roll-forward off")
}

// TestPowerLossCatchesAMissingFsync is the harness's twin: with the fsync of
// a fork's new inodes switched off (instance.UnsafeSkipForkFileSyncEnv), the
// mem-file of an acknowledged fork on ext4, a copy (fork_strategy copy: a
// fork to Standby of a Standby source otherwise links every file, so it
// has no new inode), is lost at the power cut, and the harness must report
// it.
func TestPowerLossCatchesAMissingFsync(t *testing.T) {
	testenv.NeedRoot(t)
	t.Parallel()
	res := runPowerCase(t, testfs.Ext4, powerCase{name: "acknowledged", forks: 3, survive: 3,
		env: []string{instance.UnsafeSkipForkFileSyncEnv + "=1", "FORKD_FORK_STRATEGY=" + instance.ForkStrategyCopy}})
	caught := 0
	for _, v := range res.violations {
		if strings.Contains(v, "memory") && strings.Contains(v, "does not hold its source's bytes") {
			caught++
		}
	}
	if caught == 0 {
		t.Fatalf("with the fsync of the forks' new inodes switched off the power cut lost nothing the harness saw; violations: %q", res.violations)
	}
	t.Logf("caught %d forks whose unsynced mem-file copy was lost: %q", caught, res.violations)
}

// requireLostAcknowledged is a twin's verdict: the power cut must have lost
// at least one acknowledged fork, or the switch the twin turned off is not
// what keeps forks (what names the switch, for the failure message).
func requireLostAcknowledged(t *testing.T, res powerResult, what string) {
	t.Helper()
	var lost []string
	for _, v := range res.violations {
		if strings.Contains(v, "was acknowledged before the power cut and is gone") {
			lost = append(lost, v)
		}
	}
	if len(lost) == 0 {
		t.Fatalf("with %s the power cut lost no acknowledged fork; violations: %q", what, res.violations)
	}
	t.Logf("caught %d acknowledged forks lost: %q", len(lost), lost)
}

// TestPowerLossCatchesALostLastCommit is the twin of the fork's unsynced
// commits: with the reconciler's roll-forward switched off
// (instance.UnsafeNoForkRollForwardEnv: neither from the journal entry nor
// from the fork directory's own record), the power cut right after an
// acknowledged fork loses its commits, and with them the fork, and the
// harness must report it. It shows the commits are really not fsynced and
// that the roll-forward is what keeps the fork.
// A networked fork (net) here has no warm pool: it makes its own network
// and journals that with a synced step, which makes its first commit
// durable; the twin shows its last commit is unsynced all the same. (With
// a warm network its first commit is unsynced too:
// TestPowerLossCatchesALostForkRecord.)
func TestPowerLossCatchesALostLastCommit(t *testing.T) {
	testenv.NeedRoot(t)
	t.Parallel()
	for _, net := range []bool{false, true} {
		t.Run(fmt.Sprintf("networked=%v", net), func(t *testing.T) {
			t.Parallel()
			res := runPowerCase(t, testfs.XFS, powerCase{name: "acknowledged", forks: 1, survive: 1, net: net,
				afterEnv: []string{instance.UnsafeNoForkRollForwardEnv + "=1"}})
			requireLostAcknowledged(t, res, "the roll-forward switched off")
		})
	}
}

// TestPowerLossCatchesALostForkRecord is the twin of the fork directory's
// own record (dirrecord): with only its restore switched off
// (instance.UnsafeNoForkRecordRestoreEnv; the roll-forward from a journal
// entry still runs), the power cut right after acknowledged forks loses
// both their commits, the first one included, and with them the forks, and
// the harness must report it. It shows a fork's first commit is not fsynced
// either, and that the record in its directory is what keeps it.
//
// A networked fork (net) takes its slot from the warm pool in that same
// unsynced commit, and its record holds the slot: the twin shows the
// commit is unsynced there too, and that nothing the fork does makes it
// durable behind its back (the pool's refill is unsynced as well). Its
// pool holds more warm networks than it forks: a fork that found none
// would make its network and journal that with a synced commit.
func TestPowerLossCatchesALostForkRecord(t *testing.T) {
	testenv.NeedRoot(t)
	t.Parallel()
	for _, net := range []bool{false, true} {
		t.Run(fmt.Sprintf("networked=%v", net), func(t *testing.T) {
			t.Parallel()
			pc := powerCase{name: "acknowledged", forks: 3, survive: 3,
				afterEnv: []string{instance.UnsafeNoForkRecordRestoreEnv + "=1"}}
			if net {
				pc.forks, pc.survive, pc.net, pc.warm = 2, 2, true, 4
			}
			res := runPowerCase(t, testfs.XFS, pc)
			requireLostAcknowledged(t, res, "the fork record's restore switched off")
		})
	}
}

// TestPowerLossCatchesAnUnsyncedFirstCommitWithoutDirRecords is the twin of
// the fork's synced first commit where its directory can carry no record
// (instance.NoDirRecordsEnv): with that commit unsynced as well
// (instance.UnsafeUnsyncedForkBeginEnv), the power cut right after
// acknowledged forks loses both their commits and nothing in their
// directories names them, so they are lost, and the harness must report it.
func TestPowerLossCatchesAnUnsyncedFirstCommitWithoutDirRecords(t *testing.T) {
	testenv.NeedRoot(t)
	t.Parallel()
	res := runPowerCase(t, testfs.XFS, powerCase{name: "acknowledged", forks: 3, survive: 3,
		env: []string{instance.NoDirRecordsEnv + "=1", instance.UnsafeUnsyncedForkBeginEnv + "=1"}})
	requireLostAcknowledged(t, res, "the first commit unsynced and no directory records")
}

// btrfsFreshInode gives the btrfs twins' forks a new inode (a reflinked
// mem-file, fsynced), as a live fork or a fork of a Stopped source has (its
// cloned disk). With no new inode, a fork fsyncs directories alone, and
// here btrfs then kept every fork whole even with the twins' missing
// fsyncs (it falls back to committing its whole transaction for a
// directory made in it): the twins would show nothing. After the fsync of
// a new file, which goes through btrfs's log, the later fsyncs log only
// their own directory's entries, and the links made below are lost.
const btrfsFreshInode = "FORKD_FORK_STRATEGY=" + instance.ForkStrategyReflink

// TestPowerLossCatchesAnUnsyncedSubdirectory is the twin of the fsync of
// every directory of a fork's tree: with only the top one fsynced
// (instance.UnsafeSyncForkTopDirOnlyEnv), btrfs logs the top dir's own
// entries but not the links made below it, so the power cut loses the
// acknowledged forks' linked files, and the harness must report it. (On
// XFS and ext4 one fsync forces the whole log, so only btrfs shows it.)
func TestPowerLossCatchesAnUnsyncedSubdirectory(t *testing.T) {
	testenv.NeedRoot(t)
	t.Parallel()
	res := runPowerCase(t, testfs.Btrfs, powerCase{name: "acknowledged", forks: 3, survive: 3,
		env: []string{instance.UnsafeSyncForkTopDirOnlyEnv + "=1", btrfsFreshInode}})
	if len(res.violations) == 0 {
		t.Fatal("with only the top of each fork's tree fsynced the power cut on btrfs lost nothing the harness saw")
	}
	t.Logf("caught: %q", res.violations)
}

// TestPowerLossCatchesTheXFSRuleOffXFS is the twin of XFS's fork with no
// fsync before its rename (atomicfile.SyncTree: XFS's log is in order, so
// the rename's fsync carries the tree, which the XFS cases above prove at
// every durable point): applied on btrfs (instance.UnsafeSyncForkAsOnXFSEnv),
// whose fsync of the parent logs the renamed dir but not the links made in
// it, the power cut loses the acknowledged forks' files, and the harness
// must report it.
func TestPowerLossCatchesTheXFSRuleOffXFS(t *testing.T) {
	testenv.NeedRoot(t)
	t.Parallel()
	res := runPowerCase(t, testfs.Btrfs, powerCase{name: "acknowledged", forks: 3, survive: 3,
		env: []string{instance.UnsafeSyncForkAsOnXFSEnv + "=1", btrfsFreshInode}})
	if len(res.violations) == 0 {
		t.Fatal("with XFS's rule (no fsync of the fork's tree before its rename) on btrfs the power cut lost nothing the harness saw")
	}
	t.Logf("caught: %q", res.violations)
}
