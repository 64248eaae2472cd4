package reliability

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// stressDuration is how long the random load runs (FORKD_STRESS_SECONDS
// overrides the default).
func stressDuration() time.Duration {
	if s, err := strconv.Atoi(os.Getenv("FORKD_STRESS_SECONDS")); err == nil && s > 0 {
		return time.Duration(s) * time.Second
	}
	return 20 * time.Second
}

func newStressStats() *stressStats {
	return &stressStats{ok: map[string]int{}, refused: map[string]int{}, created: map[string]string{}, deleteTried: map[string]bool{}}
}

// stressStats counts what the load did.
type stressStats struct {
	mu       sync.Mutex
	ok       map[string]int
	refused  map[string]int // 404/409: a race lost, as expected under load
	failures []string       // anything else: a bug

	// For crash-under-load: transport errors (the daemon was killed) are
	// counted, not failures; acknowledged creations and attempted deletes
	// are tracked so acknowledged work can be checked after the restart.
	tolerateTransport bool
	interrupted       int
	// For pager chaos: a 5xx with a message (a Uffd restore racing the
	// pager's death) is a clean failure, counted, not a bug.
	tolerate5xx bool
	failedClean int
	created     map[string]string // id → "instance"|"snapshot", acknowledged
	deleteTried map[string]bool   // ids a delete was sent for
}

// recordInstance is record for calls returning an instance: a memory
// integrity error the guest reported is a failure too.
func (s *stressStats) recordInstance(op string, in api.Instance, err error) {
	s.record(op, err)
	if err == nil && in.ID != "" {
		s.mu.Lock()
		s.created[in.ID] = "instance"
		s.mu.Unlock()
	}
	if err == nil && in.MemoryCheck != "ok" && in.MemoryCheck != "unknown" {
		s.mu.Lock()
		s.failures = append(s.failures, fmt.Sprintf("%s of %s: memory integrity error: %s", op, in.Name, in.MemoryCheck))
		s.mu.Unlock()
	}
}

// waitOK waits until n operations have succeeded since s was made (the
// load is under way: a condition, not a sleep) or the load has ended
// (loadDone closed).
func (s *stressStats) waitOK(t *testing.T, n int, loadDone <-chan struct{}) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(10 * time.Millisecond) {
		s.mu.Lock()
		got := sum(s.ok)
		s.mu.Unlock()
		select {
		case <-loadDone:
			return
		default:
		}
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d operations succeeded under load in 2 minutes, want %d", got, n)
		}
	}
}

func (s *stressStats) markDelete(id string) {
	s.mu.Lock()
	s.deleteTried[id] = true
	s.mu.Unlock()
}

func (s *stressStats) record(op string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var se *api.StatusError
	switch {
	case err == nil:
		s.ok[op]++
	case errors.Is(err, api.ErrNotFound), errors.Is(err, api.ErrInvalidState), errors.Is(err, api.ErrExists), errors.Is(err, api.ErrAmbiguous):
		s.refused[op]++
	case errors.As(err, &se) && se.Status < 500:
		s.failures = append(s.failures, fmt.Sprintf("%s: unexpected %d: %v", op, se.Status, err))
	case s.tolerateTransport && (!errors.As(err, &se) || errors.Is(err, api.ErrShuttingDown)):
		// The daemon was killed or stopped: a refused connection, or a
		// change refused with 503 shutting_down while it stops.
		s.interrupted++
	case s.tolerate5xx && errors.As(err, &se) && se.Message != "":
		s.failedClean++
	default:
		s.failures = append(s.failures, fmt.Sprintf("%s: %v", op, err))
	}
}

// runLoad runs workers goroutines of random valid operations against c
// for dur, recording every outcome in st. seq numbers new names (shared
// across calls so names stay unique on one daemon).
func runLoad(parent context.Context, c *api.Client, workers int, dur time.Duration, st *stressStats, seq *atomic.Int64) {
	name := func(p string) string { return fmt.Sprintf("%s-%d", p, seq.Add(1)) }
	deadline := time.Now().Add(dur)
	ctx, cancel := context.WithTimeout(parent, dur+2*time.Minute)
	defer cancel()

	pick := func(r *rand.Rand, states ...string) (api.Instance, bool) {
		list, err := c.ListInstances(ctx)
		if err != nil {
			st.record("list", err)
			return api.Instance{}, false
		}
		var cand []api.Instance
		for _, in := range list {
			for _, s := range states {
				if in.State == s {
					cand = append(cand, in)
				}
			}
		}
		if len(cand) == 0 {
			return api.Instance{}, false
		}
		return cand[r.IntN(len(cand))], true
	}
	count := func() int {
		list, _ := c.ListInstances(ctx)
		return len(list)
	}
	pickSnap := func(r *rand.Rand) (api.Snapshot, bool) {
		list, err := c.ListSnapshots(ctx)
		if err != nil || len(list) == 0 {
			return api.Snapshot{}, false
		}
		return list[r.IntN(len(list))], true
	}
	const maxInstances = 10
	worker := func(w int) {
		r := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
		for time.Now().Before(deadline) && ctx.Err() == nil {
			if _, err := c.Health(ctx); err != nil {
				// The daemon is down (a crash or restart test): wait for
				// it rather than spin on refused connections.
				st.record("health", err)
				time.Sleep(50 * time.Millisecond)
				continue
			}
			n := count()
			switch op := r.IntN(11); {
			case n < 3 || op == 0 && n < maxInstances:
				inst, err := c.CreateInstance(ctx, api.CreateInstanceRequest{Name: name("new"), MemoryMiB: testMemMiB, BootArgs: testBootArgs})
				st.recordInstance("create", inst, err)
			case op == 1 && n < maxInstances:
				if src, ok := pick(r, api.StateStandby); ok {
					target := []string{api.StateStandby, api.StateRunning}[r.IntN(2)]
					inst, err := c.ForkInstance(ctx, src.ID, api.ForkRequest{Name: name("fork"), TargetState: target})
					st.recordInstance("fork", inst, err)
				}
			case op == 2 && n < maxInstances:
				if src, ok := pick(r, api.StateRunning); ok {
					inst, err := c.ForkInstance(ctx, src.ID, api.ForkRequest{Name: name("live"), FromRunning: true})
					st.recordInstance("live-fork", inst, err)
				}
			case op == 3:
				if in, ok := pick(r, api.StateRunning, api.StatePaused); ok {
					inst, err := c.Action(ctx, in.ID, "standby", api.ActionRequest{})
					st.recordInstance("standby", inst, err)
				}
			case op == 4:
				if in, ok := pick(r, api.StateStandby); ok {
					backend := []string{api.BackendFile, api.BackendUffd}[r.IntN(2)]
					inst, err := c.Action(ctx, in.ID, "restore", api.ActionRequest{RestoreBackend: backend})
					st.recordInstance("restore-"+backend, inst, err)
				}
			case op == 5:
				if in, ok := pick(r, api.StateRunning, api.StateStandby); ok {
					comp := "none"
					if r.IntN(4) == 0 {
						comp = "zstd"
					}
					sn, err := c.CreateSnapshot(ctx, in.ID, api.SnapshotRequest{Name: name("snap"), Compression: comp})
					st.record("snapshot", err)
					if err == nil {
						st.mu.Lock()
						st.created[sn.ID] = "snapshot"
						st.mu.Unlock()
					}
				}
			case op == 6 && n < maxInstances:
				if s, ok := pickSnap(r); ok {
					inst, err := c.ForkSnapshot(ctx, s.ID, api.ForkRequest{Name: name("sfork")})
					st.recordInstance("snapshot-fork", inst, err)
				}
			case op == 7 && n > 3:
				if in, ok := pick(r, api.StateRunning, api.StateStandby, api.StateStopped, api.StatePaused, api.StateCreated); ok {
					st.markDelete(in.ID)
					st.record("delete", c.DeleteInstance(ctx, in.ID))
				}
			case op == 8:
				if s, ok := pickSnap(r); ok {
					st.markDelete(s.ID)
					st.record("snapshot-delete", c.DeleteSnapshot(ctx, s.ID))
				}
			case op == 9 && n > 3 && n < maxInstances:
				// Delete a source while it is being forked: the fork either
				// completes (and is independent) or finds no source.
				if src, ok := pick(r, api.StateStandby); ok {
					var wg sync.WaitGroup
					wg.Add(2)
					go func() {
						defer wg.Done()
						inst, err := c.ForkInstance(ctx, src.ID, api.ForkRequest{Name: name("orphan")})
						st.recordInstance("fork-while-deleting", inst, err)
					}()
					st.markDelete(src.ID)
					go func() {
						defer wg.Done()
						st.record("delete-while-forking", c.DeleteInstance(ctx, src.ID))
					}()
					wg.Wait()
				}
			case op == 10:
				if in, ok := pick(r, api.StateRunning); ok {
					inst, err := c.Action(ctx, in.ID, "pause", api.ActionRequest{})
					st.recordInstance("pause", inst, err)
					inst, err = c.Action(ctx, in.ID, "resume", api.ActionRequest{})
					st.recordInstance("resume", inst, err)
				}
			}
		}
	}
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() { defer wg.Done(); worker(w) }()
	}
	wg.Wait()
}

// TestRandomConcurrentLoadKeepsEveryInvariant runs 6 goroutines doing
// random valid operations against one daemon for a bounded time: creates,
// forks (of Standby instances, live from Running ones, of snapshots, to
// Standby and Running), standbys, restores (file and uffd backends), snapshots (some
// compressed), deletes of instances and snapshots, and deleting a source
// while it is being forked. Every call must succeed or lose a race cleanly
// (404/409). Afterwards the invariants hold, everything is operable and no
// guest reports a memory integrity error.
func TestRandomConcurrentLoadKeepsEveryInvariant(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil)
	c := d.Client
	createStandby(t, c, "seed-a")
	createStandby(t, c, "seed-b")
	createRunning(t, c, "seed-r")

	st := newStressStats()
	var seq atomic.Int64
	runLoad(context.Background(), c, 6, stressDuration(), st, &seq)

	total := 0
	for op, n := range st.ok {
		total += n
		t.Logf("%-22s ok %4d  lost a race %4d", op, n, st.refused[op])
	}
	refused := 0
	for _, n := range st.refused {
		refused += n
	}
	addFigure("stress_operations_ok", int64(total))
	addFigure("stress_operations_refused_cleanly", int64(refused))
	t.Logf("stress: %d operations succeeded, %d lost a race cleanly, %d failed", total, refused, len(st.failures))
	for _, f := range st.failures {
		t.Errorf("operation failed under load: %s", f)
	}
	checkAll(t, d)
	ops, err := Exercise(ctxT(t, 2*time.Minute), c)
	addFigure("stress_operations_ok", int64(ops))
	if err != nil {
		t.Errorf("after the load, not everything is operable:\n%v", err)
	}
	checkAll(t, d)
}

// TestCrashUnderLoadLosesNothing SIGKILLs the daemon at a random moment
// while 4 goroutines run random operations, three times over. After each
// restart: the invariants hold, every instance and snapshot whose creation
// was acknowledged (and that no one tried to delete) still exists,
// everything is operable, and every guest's memory verifies.
func TestCrashUnderLoadLosesNothing(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil)
	createStandby(t, d.Client, "seed-a")
	createRunning(t, d.Client, "seed-r")
	var seq atomic.Int64
	r := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
	for round := 0; round < 3; round++ {
		st := newStressStats()
		st.tolerateTransport = true
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { runLoad(ctx, d.Client, 4, 30*time.Second, st, &seq); close(done) }()
		st.waitOK(t, 3+r.IntN(10), done) // a random point in the load
		d.Kill()
		cancel()
		<-done
		addFigure("crashes_injected", 1)
		addFigure("crash_under_load_operations_ok", int64(sum(st.ok)))
		t.Logf("round %d: killed after %d operations succeeded (%d interrupted)", round, sum(st.ok), st.interrupted)
		for _, f := range st.failures {
			t.Errorf("round %d: operation failed before the crash: %s", round, f)
		}

		d = restart(t, d, nil)
		checkAll(t, d)
		for id, kind := range st.created {
			if st.deleteTried[id] {
				continue
			}
			var err error
			if kind == "instance" {
				_, err = d.Client.GetInstance(ctxT(t, 10*time.Second), id)
			} else {
				_, err = d.Client.GetSnapshot(ctxT(t, 10*time.Second), id)
			}
			if err != nil {
				t.Errorf("round %d: acknowledged %s %s is gone after the crash: %v", round, kind, id, err)
			}
		}
		ops, err := Exercise(ctxT(t, 2*time.Minute), d.Client)
		addFigure("operations_after_crash", int64(ops))
		if err != nil {
			t.Errorf("round %d: after the crash under load, not everything is operable:\n%v", round, err)
		}
		checkAll(t, d)
	}
}

func sum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// TestPagerKilledUnderLoadIsContained kills the pager twice while 4
// goroutines run the random load (half the restores through the pager).
// A Uffd restore racing the kill may fail, with a message; VMs the dead
// pager served go to Error and can be stopped; afterwards new Uffd restores
// work, the invariants hold (no leaked VMM or session) and everything else
// is operable with its memory intact.
func TestPagerKilledUnderLoadIsContained(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil)
	createStandby(t, d.Client, "seed-a")
	uffdRestore(t, d.Client, "seed-a")
	createStandby(t, d.Client, "seed-b")
	st := newStressStats()
	st.tolerate5xx = true
	var seq atomic.Int64
	done := make(chan struct{})
	go func() { runLoad(context.Background(), d.Client, 4, 10*time.Second, st, &seq); close(done) }()
	kills := 0
	for _, after := range []int{8, 16} { // operations succeeded before each kill
		st.waitOK(t, after, done)
		for _, p := range ProcessesUnder(d.Layout.Root()) {
			if p.Kind == "pager" && syscall.Kill(p.Pid, syscall.SIGKILL) == nil {
				kills++
			}
		}
	}
	<-done
	addFigure("faults_injected", int64(kills))
	addFigure("stress_operations_ok", int64(sum(st.ok)))
	t.Logf("pager killed %d times under load: %d operations succeeded, %d failed cleanly", kills, sum(st.ok), st.failedClean)
	for _, f := range st.failures {
		t.Errorf("operation failed under pager chaos: %s", f)
	}
	ctx := ctxT(t, 2*time.Minute)
	if err := WaitSettled(ctx, d.Client, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	list, err := d.Client.ListInstances(ctx)
	if err != nil {
		t.Fatal(err)
	}
	errored := 0
	for _, in := range list {
		if in.State == api.StateError {
			errored++
			if _, err := d.Client.Action(ctx, in.ID, "stop", api.ActionRequest{}); err != nil {
				t.Errorf("stop %s (Error: %s): %v", in.Name, in.Error, err)
			}
		}
	}
	checkAll(t, d)
	var restoredUffd bool
	for _, in := range list {
		if cur, err := d.Client.GetInstance(ctx, in.ID); err == nil && cur.State == api.StateStandby {
			if _, err := d.Client.Action(ctx, in.ID, "restore", api.ActionRequest{RestoreBackend: api.BackendUffd}); err != nil {
				t.Errorf("Uffd restore after the pager chaos: %v", err)
			}
			restoredUffd = true
			break
		}
	}
	t.Logf("%d VMs were in Error after the chaos (stopped); a Uffd restore afterwards was tried: %v", errored, restoredUffd)
	if _, err := Exercise(ctx, d.Client); err != nil {
		t.Errorf("after the pager chaos: %v", err)
	}
	checkAll(t, d)
}

// TestGracefulRestartUnderLoadFinishesInFlightWork stops the daemon with
// SIGTERM (an upgrade, a config change) while 4 goroutines run the random
// load, and starts it again, twice. In-flight operations finish rather than
// being cut off: no call gets an error other than a lost race, a refused
// connection while the daemon is down or a 503 shutting_down while it stops; VMs keep running through the
// restart; afterwards the invariants hold and everything is operable.
func TestGracefulRestartUnderLoadFinishesInFlightWork(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil)
	createStandby(t, d.Client, "seed-a")
	createRunning(t, d.Client, "seed-r")
	var seq atomic.Int64
	for round := 0; round < 2; round++ {
		st := newStressStats()
		st.tolerateTransport = true
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { runLoad(ctx, d.Client, 4, 30*time.Second, st, &seq); close(done) }()
		st.waitOK(t, 6, done)
		running := map[int]bool{}
		if list, err := d.Client.ListInstances(ctxT(t, 10*time.Second)); err == nil {
			for _, in := range list {
				if in.State == api.StateRunning {
					running[in.Pid] = true
				}
			}
		}
		if err := d.Stop(); err != nil {
			t.Fatal(err)
		}
		cancel()
		<-done
		addFigure("graceful_restarts", 1)
		addFigure("stress_operations_ok", int64(sum(st.ok)))
		for _, f := range st.failures {
			t.Errorf("round %d: operation failed across a graceful stop: %s", round, f)
		}
		d = restart(t, d, nil)
		// A VM that was running when the stop began and was not stood by
		// or deleted meanwhile is still the same process.
		list, err := d.Client.ListInstances(ctxT(t, 10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		kept := 0
		for _, in := range list {
			if in.State == api.StateRunning && running[in.Pid] {
				kept++
			}
		}
		t.Logf("round %d: %d operations succeeded, %d refused while down; %d VMs kept their VMM across the restart",
			round, sum(st.ok), st.interrupted, kept)
		checkAll(t, d)
		ops, err := Exercise(ctxT(t, 2*time.Minute), d.Client)
		addFigure("operations_after_crash", int64(ops))
		if err != nil {
			t.Errorf("round %d: after the graceful restart: %v", round, err)
		}
		checkAll(t, d)
	}
}
