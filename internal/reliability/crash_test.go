package reliability

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/instance"
	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/testenv"
)

// crashCase is one crash point: the daemon runs with FORKD_TEST_CRASH_AT=at,
// setup prepares instances (no step of setup matches at), and op drives the
// operation that reaches the step and kills the daemon.
type crashCase struct {
	at      string
	variant string // tells cases with the same crash point apart
	setup   func(t *testing.T, c *api.Client)
	op      func(ctx context.Context, c *api.Client) error
	// gone lists names the op may legitimately remove (a delete); every
	// other instance and snapshot present before the op must survive.
	gone []string
	// check runs extra assertions after the restart.
	check func(t *testing.T, d *Daemon)
	// net runs the case on a networked daemon (network_test.go), with a
	// warm pool of warm networks.
	net  bool
	warm int
	// env is extra daemon environment while the hook is armed.
	env []string
	// offline changes the data dir while no daemon runs, after setup and
	// before the armed start.
	offline func(t *testing.T, d *Daemon)
	// atStart: the armed start itself reaches the step (op is nil).
	atStart bool
}

func crashCases() []crashCase {
	running := func(t *testing.T, c *api.Client) { createRunning(t, c, "src") }
	standby := func(t *testing.T, c *api.Client) { createStandby(t, c, "src") }
	created := func(t *testing.T, c *api.Client) {
		f := false
		if _, err := c.CreateInstance(context.Background(), api.CreateInstanceRequest{Name: "src", MemoryMiB: testMemMiB, BootArgs: testBootArgs, Start: &f}); err != nil {
			t.Fatal(err)
		}
	}
	// restoredShared: src was restored (it has a base) and a Standby fork
	// hardlinks that base's inode: its next standby must unshare first.
	restoredShared := func(t *testing.T, c *api.Client) {
		createStandby(t, c, "src")
		if _, err := c.ForkInstance(context.Background(), "src", api.ForkRequest{Name: "sib"}); err != nil {
			t.Fatal(err)
		}
		action(t, c, "src", "restore")
	}
	withSnapshot := func(t *testing.T, c *api.Client) {
		createRunning(t, c, "src")
		if _, err := c.CreateSnapshot(context.Background(), "src", api.SnapshotRequest{Name: "snap"}); err != nil {
			t.Fatal(err)
		}
	}
	withFork := func(t *testing.T, c *api.Client) {
		createStandby(t, c, "src")
		if _, err := c.ForkInstance(context.Background(), "src", api.ForkRequest{Name: "kid"}); err != nil {
			t.Fatal(err)
		}
	}
	act := func(a string) func(ctx context.Context, c *api.Client) error {
		return func(ctx context.Context, c *api.Client) error {
			_, err := c.Action(ctx, "src", a, api.ActionRequest{})
			return err
		}
	}
	create := func(ctx context.Context, c *api.Client) error {
		_, err := c.CreateInstance(ctx, api.CreateInstanceRequest{Name: "new", MemoryMiB: testMemMiB, BootArgs: testBootArgs})
		return err
	}
	fork := func(ctx context.Context, c *api.Client) error {
		_, err := c.ForkInstance(ctx, "src", api.ForkRequest{Name: "kid"})
		return err
	}
	liveFork := func(ctx context.Context, c *api.Client) error {
		_, err := c.ForkInstance(ctx, "src", api.ForkRequest{Name: "kid", FromRunning: true})
		return err
	}
	snapshot := func(comp string) func(ctx context.Context, c *api.Client) error {
		return func(ctx context.Context, c *api.Client) error {
			_, err := c.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "snap", Compression: comp})
			return err
		}
	}
	// A data dir in the layout before jails (guests/<id>/): the start
	// migrates it, with a running VM among its guests.
	legacyMix := func(t *testing.T, c *api.Client) {
		createStandby(t, c, "src")
		if _, err := c.ForkInstance(context.Background(), "src", api.ForkRequest{Name: "kid", TargetState: api.StateRunning}); err != nil {
			t.Fatal(err)
		}
	}
	del := func(ctx context.Context, c *api.Client) error { return c.DeleteInstance(ctx, "src") }
	delSnap := func(ctx context.Context, c *api.Client) error { return c.DeleteSnapshot(ctx, "snap") }
	// A batch: three concurrent forks whose commits share one group (the
	// store holds each group until three units wait).
	batch := []string{instance.GroupMinEnv + "=3"}
	noRecords := []string{instance.NoDirRecordsEnv + "=1"}
	forkBatch := func(ctx context.Context, c *api.Client) error {
		errs := make([]error, 3)
		var wg sync.WaitGroup
		for i := range errs {
			wg.Go(func() { _, errs[i] = c.ForkInstance(ctx, "src", api.ForkRequest{Name: fmt.Sprintf("kid%d", i)}) })
		}
		wg.Wait()
		return errors.Join(errs...)
	}
	batchSurvives := func(want int) func(t *testing.T, d *Daemon) {
		return func(t *testing.T, d *Daemon) {
			got := 0
			for i := range 3 {
				if _, err := d.Client.GetInstance(context.Background(), fmt.Sprintf("kid%d", i)); err == nil {
					got++
				}
			}
			if got != want {
				t.Errorf("%d forks of a batch of 3 survived the crash, want %d (a group commits whole or not at all)", got, want)
			}
		}
	}
	kidSurvives := func(t *testing.T, d *Daemon) {
		if _, err := d.Client.GetInstance(context.Background(), "kid"); err != nil {
			t.Errorf("the fork did not survive its source's interrupted delete: %v", err)
		}
	}

	cases := []crashCase{
		{at: "create:begun", op: create},
		{at: "create:files", op: create},
		{at: "start:begun", setup: created, op: act("start")},
		{at: "start:booted", setup: created, op: act("start")},
		{at: "stop:begun", setup: running, op: act("stop")},
		{at: "restore:begun", setup: standby, op: act("restore")},
		{at: "restore:launched", setup: standby, op: act("restore")},
		{at: "restore:resumed", setup: standby, op: act("restore")},
		// A fork with no network whose dir carries its record makes one
		// commit, after its rename (files, then committing, committed):
		// only a fork of two commits reaches begun and beginning, so those
		// cases keep no directory records.
		{at: "fork:begun", variant: "no-dir-records", setup: standby, op: fork, env: noRecords},
		{at: "fork:begun", variant: "from-snapshot-no-dir-records", setup: withSnapshot, env: noRecords, op: func(ctx context.Context, c *api.Client) error {
			_, err := c.ForkSnapshot(ctx, "snap", api.ForkRequest{Name: "kid"})
			return err
		}},
		{at: "fork:files", setup: standby, op: fork},
		{at: "fork:committing", setup: standby, op: fork},
		{at: "fork:committed", setup: standby, op: fork},
		{at: "fork:files", variant: "no-dir-records", setup: standby, op: fork, env: noRecords},
		{at: "fork:committing", variant: "no-dir-records", setup: standby, op: fork, env: noRecords},
		{at: "fork:beginning", variant: "batch-of-3-no-dir-records", setup: standby, op: forkBatch, env: slices.Concat(batch, noRecords), check: batchSurvives(0)},
		// The last commit lost: every fork of the batch has its dir in
		// place, and the reconciler completes all three.
		{at: "fork:committing", variant: "batch-of-3", setup: standby, op: forkBatch, env: batch, check: batchSurvives(3)},
		{at: "fork:committed", variant: "batch-of-3", setup: standby, op: forkBatch, env: batch, check: batchSurvives(3)},
		{at: "snapshot:begun", setup: standby, op: snapshot("none")},
		{at: "snapshot:stored", setup: standby, op: snapshot("none")},
		{at: "delete:begun", setup: withFork, op: del, gone: []string{"src"}, check: kidSurvives},
		{at: "snapshot-delete:begun", setup: withSnapshot, op: delSnap, gone: []string{"snap"}},
		{at: "compress:compressed", setup: running, op: snapshot("zstd")},
		{at: "compress:raw-removed", setup: running, op: snapshot("zstd")},
		{at: "migrate:begun", setup: legacyMix, offline: toLegacyLayout, atStart: true},
		{at: "migrate:moved", setup: legacyMix, offline: toLegacyLayout, atStart: true},
	}
	for _, step := range []string{"begun", "promoted", "creating", "created"} {
		cases = append(cases,
			crashCase{at: "standby:" + step, setup: running, op: act("standby")},
			crashCase{at: "standby:" + step, variant: "diff-into-shared-base", setup: restoredShared, op: act("standby"),
				check: func(t *testing.T, d *Daemon) {
					if _, err := d.Client.GetInstance(context.Background(), "sib"); err != nil {
						t.Errorf("the fork sharing the base is gone: %v", err)
					}
				}})
	}
	uffdRestore := func(ctx context.Context, c *api.Client) error {
		_, err := c.Action(ctx, "src", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd})
		return err
	}
	for _, step := range []string{"begun", "session", "launched", "resumed"} {
		cases = append(cases, crashCase{at: "restore:" + step, variant: "uffd", setup: standby, op: uffdRestore})
	}
	for _, step := range []string{"paused", "creating", "created", "files", "committed"} {
		cases = append(cases, crashCase{at: "fork:" + step, variant: "live", setup: running, op: liveFork})
	}
	for _, step := range []string{"paused", "creating", "created", "stored"} {
		cases = append(cases, crashCase{at: "snapshot:" + step, setup: running, op: snapshot("none")})
	}
	cases = append(cases, batchCrashCases()...)
	cases = append(cases, networkCrashCases()...)
	return append(cases, imageCrashCases()...)
}

// TestCrashCasesCoverEveryJournalStep checks the crash cases against the
// list of crash points the code itself declares (instance.JournalSteps):
// every declared step has at least one case, and no case names a step the
// code no longer has. A new journal step without a crash case fails here.
func TestCrashCasesCoverEveryJournalStep(t *testing.T) {
	covered := map[string]bool{}
	for _, tc := range crashCases() {
		covered[tc.at] = true
	}
	declared := map[string]bool{}
	for kind, steps := range instance.JournalSteps() {
		for _, s := range steps {
			declared[kind+":"+s] = true
			if !covered[kind+":"+s] {
				t.Errorf("journal step %s:%s has no crash case in crashCases()", kind, s)
			}
		}
	}
	for at := range covered {
		if !declared[at] {
			t.Errorf("crash case %s names a step instance.JournalSteps does not declare", at)
		}
	}
}

// TestCrashAtEveryJournalStepLosesNothing SIGKILLs the daemon at each
// journal step of create, start, stop, standby (fresh and diff into a
// shared base), restore, fork (standby and live), snapshot (standby and
// live), delete, snapshot delete, compression, image pulls (direct and by a
// create) and deletes, and a create from an image. After a restart without
// the hook it checks the invariants (stable states, no leftovers, no leaked
// VMM, no shared inode writable), that nothing but a deleted subject was
// lost, and that everything is operable with its memory intact.
func TestCrashAtEveryJournalStepLosesNothing(t *testing.T) {
	for _, tc := range crashCases() {
		name := tc.at
		if tc.variant != "" {
			name += "/" + tc.variant
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			runCrashCase(t, tc)
		})
	}
}

func runCrashCase(t *testing.T, tc crashCase) {
	var d *Daemon
	if tc.net {
		d = newNetDaemonWarm(t, tc.warm)
	} else {
		d = newDaemon(t, nil)
	}
	if tc.setup != nil {
		tc.setup(t, d.Client)
	}
	before := names(t, d.Client)
	restingBytes := restingMemFiles(t, d)
	// Arm the hook only now: setup may pass through the same step.
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	if tc.offline != nil {
		tc.offline(t, d)
	}
	armed := append([]string{instance.CrashAtEnv + "=" + tc.at}, tc.env...)
	if tc.atStart {
		// The start itself reaches the step: it must die there.
		if nd, err := d.Restart(context.Background(), armed); err == nil {
			nd.Shutdown(context.Background())
			t.Fatalf("crash hook %s never fired during the start", tc.at)
		} else if !strings.Contains(err.Error(), "signal: killed") {
			t.Fatalf("the armed start at %s failed otherwise than by the hook's SIGKILL: %v", tc.at, err)
		}
	} else {
		d = restart(t, d, armed)
		c := d.Client
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		opErr := tc.op(ctx, c)
		ws, err := d.WaitExit(20 * time.Second)
		if err != nil {
			t.Fatalf("crash hook %s never fired (op returned %v): is the step still journalled under that name? %v", tc.at, opErr, err)
		}
		if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("daemon ended with %v, want SIGKILL from the hook", ws)
		}
	}
	addFigure("crashes_injected", 1)

	d = restart(t, d, nil)
	checkAll(t, d)
	after := names(t, d.Client)
	for n := range before {
		if !after[n] && !contains(tc.gone, n[2:]) {
			t.Errorf("%s existed before the crash and is gone after it", n)
		}
	}
	verifyRestingMemFiles(t, d, restingBytes)
	if tc.check != nil {
		tc.check(t, d)
	}
	ops, err := Exercise(ctxT(t, 90*time.Second), d.Client)
	addFigure("operations_after_crash", int64(ops))
	if err != nil {
		t.Errorf("after the crash at %s, not everything is operable:\n%v", tc.at, err)
	}
	checkAll(t, d)
}

// names is the set of instance ("i:name") and snapshot ("s:name") names.
func names(t *testing.T, c *api.Client) map[string]bool {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	out := map[string]bool{}
	insts, err := c.ListInstances(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range insts {
		out["i:"+in.Name] = true
	}
	snaps, err := c.ListSnapshots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range snaps {
		out["s:"+s.Name] = true
	}
	return out
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// restingMemFiles hashes the mem-files at rest: every Standby instance's
// snapshot-latest/memory and every store snapshot's raw memory, by id.
func restingMemFiles(t *testing.T, d *Daemon) map[string]string {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	out := map[string]string{}
	insts, err := d.Client.ListInstances(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range insts {
		if g, err := d.Layout.Guest(in.ID); err == nil && in.State == api.StateStandby {
			out["i:"+in.ID] = fileSum(t, g.Latest().Memory())
		}
	}
	snaps, err := d.Client.ListSnapshots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, sn := range snaps {
		if sd, err := d.Layout.Snapshot(sn.ID); err == nil {
			if _, err := os.Stat(sd.Memory()); err == nil {
				out["s:"+sn.ID] = fileSum(t, sd.Memory())
			}
		}
	}
	return out
}

// verifyRestingMemFiles checks that a crash changed no byte of a mem-file
// at rest: an instance still Standby, or a snapshot still holding its raw
// memory, has exactly the bytes it had before. (One restored, deleted or
// compressed meanwhile is checked by Exercise instead.) It counts the bytes
// it verified.
func verifyRestingMemFiles(t *testing.T, d *Daemon, before map[string]string) {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	for key, sum := range before {
		kind, id := key[:1], key[2:]
		var path string
		switch kind {
		case "i":
			in, err := d.Client.GetInstance(ctx, id)
			if err != nil || in.State != api.StateStandby {
				continue
			}
			g, _ := d.Layout.Guest(id)
			path = g.Latest().Memory()
		case "s":
			sd, _ := d.Layout.Snapshot(id)
			path = sd.Memory()
		}
		st, err := os.Stat(path)
		if err != nil {
			continue
		}
		if got := fileSum(t, path); got != sum {
			t.Errorf("the crash changed the bytes of %s", path)
			continue
		}
		addFigure("mem_file_bytes_verified_after_crash", st.Size())
	}
}

// TestRestartKillsVMMsNoRecordNames plants what a crash between a VMM's
// launch and the journal step recording its pid leaves behind: a VMM on a
// Standby instance's socket path that no record names. The restarted
// daemon's reconciler must kill it (else it runs forever, and the next
// restore starts a second VMM on the same socket).
func TestRestartKillsVMMsNoRecordNames(t *testing.T) {
	t.Parallel()
	d, stray, exited := strayVMM(t)
	d = restart(t, d, nil)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Fatalf("the reconciler left the unrecorded VMM pid %d running", stray.Process.Pid)
	}
	checkAll(t, d)
	if _, err := Exercise(ctxT(t, 60*time.Second), d.Client); err != nil {
		t.Error(err)
	}
}

// TestRestartServesOnlyOnceTheVMMsItKilledExited: a VMM the reconciler
// kills may take a while to exit (a large memory to tear down, or in the
// kernel when the SIGKILL comes), and until it has exited it holds its uid,
// its cgroup and its guest dir. The restarted daemon must not serve before
// then. The stray VMM sits in a frozen cgroup v1 freezer, where a SIGKILL
// stays pending until the cgroup thaws: the test thaws it thawDelay after
// the kill, and requires the stray to have exited by the time the daemon
// answers. (Its twin, a reconciler that sends the SIGKILL and goes on,
// serves while the stray still runs.)
func TestRestartServesOnlyOnceTheVMMsItKilledExited(t *testing.T) {
	t.Parallel()
	const thawDelay = 2 * time.Second
	d, stray, exited := strayVMM(t)
	thaw := freeze(t, stray.Process)
	thawed := make(chan struct{})
	go func() {
		defer close(thawed)
		for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if sigkillPending(stray.Process.Pid) {
				time.Sleep(thawDelay)
				break
			}
		}
		thaw()
	}()
	d = restart(t, d, nil)
	select {
	case <-exited:
	default:
		t.Errorf("the restarted daemon serves while the VMM it killed (pid %d) has not exited (SIGKILL pending: %v)",
			stray.Process.Pid, sigkillPending(stray.Process.Pid))
	}
	<-thawed
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Fatalf("the reconciler left the unrecorded VMM pid %d running", stray.Process.Pid)
	}
	checkAll(t, d)
}

// strayVMM makes a daemon with one Standby instance, stops it, and starts
// a VMM for that instance that no record names (as a crash between a
// launch and its journal step leaves). exited closes when the VMM exits.
func strayVMM(t *testing.T) (*Daemon, *exec.Cmd, <-chan struct{}) {
	t.Helper()
	d := newDaemon(t, nil)
	src := createStandby(t, d.Client, "src")
	g, _ := d.Layout.Guest(src.ID)
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	stray := exec.Command(forkdBinary(t), "vmm", "--api-sock", g.VMMSock(), "--id", src.ID)
	if err := stray.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { stray.Wait(); close(exited) }()
	t.Cleanup(func() { stray.Process.Kill(); <-exited })
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if len(ProcessesUnder(d.Layout.Root())) > 0 {
			break
		}
	}
	addFigure("faults_injected", 1)
	return d, stray, exited
}

// freeze puts p in a new, frozen cgroup of the host's v1 freezer
// hierarchy, where a SIGKILL stays pending until thaw. The test's cleanup
// thaws it, kills p and removes the cgroup. A v2 freezer will not do: a
// frozen v2 task dies at once on SIGKILL.
func freeze(t *testing.T, p *os.Process) (thaw func()) {
	t.Helper()
	m, err := jail.ReadMounts(jail.MountTable)
	if err != nil {
		t.Fatal(err)
	}
	if m.V1["freezer"] == "" {
		testenv.Need(t, testenv.Cgroup, "no cgroup v1 freezer hierarchy is mounted (a frozen process must outlive its SIGKILL)")
	}
	dir := filepath.Join(m.V1["freezer"], fmt.Sprintf("forkdtest-freeze-%d", p.Pid))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(file, v string) error { return os.WriteFile(filepath.Join(dir, file), []byte(v), 0o644) }
	var once sync.Once
	thaw = func() {
		once.Do(func() {
			if err := write("freezer.state", "THAWED"); err != nil {
				t.Errorf("thaw %s: %v", dir, err)
			}
		})
	}
	t.Cleanup(func() {
		thaw()
		p.Kill() // through its pidfd: never another process, even once reaped
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if err := os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
		}
		t.Errorf("cannot remove the freezer cgroup %s", dir)
	})
	if err := write("cgroup.procs", strconv.Itoa(p.Pid)); err != nil {
		t.Fatal(err)
	}
	if err := write("freezer.state", "FROZEN"); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if b, _ := os.ReadFile(filepath.Join(dir, "freezer.state")); strings.TrimSpace(string(b)) == "FROZEN" {
			return thaw
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never reached FROZEN", dir)
		}
	}
}

// sigkillPending reports whether pid has a SIGKILL pending (sent, not yet
// acted on): /proc/<pid>/status ShdPnd or SigPnd has bit 9.
func sigkillPending(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		if k != "ShdPnd" && k != "SigPnd" {
			continue
		}
		if mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64); err == nil && mask&(1<<(syscall.SIGKILL-1)) != 0 {
			return true
		}
	}
	return false
}

// toLegacyLayout puts every guest dir of a stopped daemon's data dir back
// where the layout before jails kept it: guests/<id>/, the VMM's log in its
// logs/. A VMM running in one keeps running (its working directory and log
// move with the directory), as a VMM from before an upgrade does.
func toLegacyLayout(t *testing.T, d *Daemon) {
	t.Helper()
	l := d.Layout
	ents, err := os.ReadDir(l.JailsDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(l.LegacyGuestsDir(), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if _, pooled := guestdir.PooledID(e.Name()); pooled {
			continue // an empty fork tree made ahead: no guest's (its reconciler removes it)
		}
		g, err := l.Guest(e.Name())
		if err != nil {
			t.Fatal(err)
		}
		dir, log, _ := l.LegacyGuest(e.Name())
		if err := os.Rename(g.Dir, dir); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Dir(log), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(g.VMMLog(), log); err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		if err := os.Remove(g.Jail); err != nil {
			t.Fatal(err)
		}
	}
}
