package instance

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/capacity"
	"github.com/forkd/forkd/internal/guestdir"
)

// checkBatch checks a batch's answer: n forks named name-1..name-n, in
// that order, each in state want with a record saying so.
func checkBatch(t *testing.T, m *Manager, got []api.Instance, name string, n int, want string) {
	t.Helper()
	if len(got) != n {
		t.Fatalf("the batch made %d forks, want %d", len(got), n)
	}
	for i, f := range got {
		if wantName := fmt.Sprintf("%s-%d", name, i+1); f.Name != wantName {
			t.Errorf("fork %d is named %q, want %q", i, f.Name, wantName)
		}
		if f.State != want {
			t.Errorf("fork %s: %s (error %q), want %s", f.Name, f.State, f.Error, want)
		}
		in, err := m.GetInstance(context.Background(), f.Name)
		if err != nil || in.ID != f.ID || in.State != want {
			t.Errorf("fork %s as recorded: %+v, %v; want %s with id %s", f.Name, in, err, want, f.ID)
		}
	}
}

// batchLeftNothing checks a failed batch made nothing: no fork of names
// exists, the jails dir holds exactly the dirs of the instances that exist
// (wantDirs), no temp dir is left, and no journal entry is open.
func batchLeftNothing(t *testing.T, m *Manager, name string, n, wantDirs int) {
	t.Helper()
	ctx := context.Background()
	for i := range n {
		ref := fmt.Sprintf("%s-%d", name, i+1)
		if in, err := m.GetInstance(ctx, ref); !errors.Is(err, api.ErrNotFound) {
			t.Errorf("fork %s of the failed batch: %+v, %v; want none", ref, in, err)
		}
	}
	ents, err := os.ReadDir(m.layout.JailsDir())
	if err != nil {
		t.Fatal(err)
	}
	dirs := 0
	for _, e := range ents {
		if guestdir.IsTemp(e.Name()) {
			t.Errorf("the failed batch left a temp dir %s", e.Name())
			continue
		}
		dirs++
	}
	if dirs != wantDirs {
		t.Errorf("%d guest dirs after the failed batch, want %d (nothing of the batch kept)", dirs, wantDirs)
	}
	if open, err := m.db.OpenEntries(ctx); err != nil || len(open) != 0 {
		t.Errorf("%d journal entries open after the failed batch (%v), want 0", len(open), err)
	}
}

// A batch of a Standby instance and of a store snapshot makes every fork
// Standby, named name-1..name-N, each linking its source's mem-file, and
// each restores with its memory intact.
func TestForkBatchMakesEveryFork(t *testing.T) {
	m := newTestManager(t)
	ctx := context.Background()
	createRunning(t, m, "src")
	if _, err := m.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "snap"}); err != nil {
		t.Fatal(err)
	}
	src := action(t, m, "src", "standby")
	srcMem := fingerprint(t, latestMem(t, m, src.ID))
	forks, err := m.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "kid", Count: 4})
	if err != nil {
		t.Fatal(err)
	}
	checkBatch(t, m, forks, "kid", 4, api.StateStandby)
	for _, f := range forks {
		if got := fingerprint(t, latestMem(t, m, f.ID)); got.ino != srcMem.ino || got.sum != srcMem.sum {
			t.Errorf("fork %s does not link its source's mem-file", f.Name)
		}
	}
	snapForks, err := m.ForkSnapshotBatch(ctx, "snap", api.ForkBatchRequest{Name: "sk", Count: 3})
	if err != nil {
		t.Fatal(err)
	}
	checkBatch(t, m, snapForks, "sk", 3, api.StateStandby)
	for _, f := range append(forks, snapForks...) {
		action(t, m, f.ID, "restore")
		verifyGuest(t, m, f.ID)
	}
	if in, _ := m.GetInstance(ctx, "src"); in.State != api.StateStandby {
		t.Errorf("the source is %s after the batches, want Standby", in.State)
	}
	if got := fingerprint(t, latestMem(t, m, src.ID)); got.sum != srcMem.sum {
		t.Error("the batch changed its source's mem-file")
	}
	if open, _ := m.db.OpenEntries(ctx); len(open) != 0 {
		t.Errorf("%d journal entries open after the batches", len(open))
	}
}

// target_state Running restores every fork of the batch.
func TestForkBatchToRunningRestoresThemAll(t *testing.T) {
	m := newTestManager(t)
	createRunning(t, m, "src")
	action(t, m, "src", "standby")
	forks, err := m.ForkInstanceBatch(context.Background(), "src", api.ForkBatchRequest{Name: "kid", Count: 3, TargetState: api.StateRunning})
	if err != nil {
		t.Fatal(err)
	}
	checkBatch(t, m, forks, "kid", 3, api.StateRunning)
	for _, f := range forks {
		verifyGuest(t, m, f.ID)
	}
}

// A batch is all or none: a batch one of whose names is taken fails with
// ErrExists (409), one the capacity ledger refuses and one of a Running
// source are refused, and a batch that fails once every fork's dir is in
// place (an injected fault) removes them all; none leaves a fork, a dir,
// a temp dir or an open journal entry. The twins: the same batches with the
// name free, within the cap, and without the fault make every fork.
func TestForkBatchIsAllOrNone(t *testing.T) {
	h := &fakeHost{}
	h.memTotal.Store(24 << 30)
	h.diskFree.Store(1 << 40)
	m := newTestManager(t, h.opt(capacity.Limits{MaxRunningVMs: 2}))
	ctx := context.Background()
	createRunning(t, m, "src")
	action(t, m, "src", "standby")

	// A taken name: the fork named kid-3 fails its first commit while its
	// siblings' commits are made, and the batch removes them.
	fork(t, m, "src", api.ForkRequest{Name: "kid-3"})
	_, err := m.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "kid", Count: 4})
	if !errors.Is(err, api.ErrExists) {
		t.Fatalf("a batch with a taken name: %v, want ErrExists", err)
	}
	for _, n := range []string{"kid-1", "kid-2", "kid-4"} {
		if _, err := m.GetInstance(ctx, n); !errors.Is(err, api.ErrNotFound) {
			t.Errorf("fork %s of the batch with a taken name exists (%v)", n, err)
		}
	}
	batchLeftNothing(t, m, "kid", 2, 2) // src and kid-3 only
	if err := m.DeleteInstance(ctx, "kid-3"); err != nil {
		t.Fatal(err)
	}
	twin, err := m.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "kid", Count: 4})
	if err != nil {
		t.Fatalf("the same batch with the name free: %v", err)
	}
	checkBatch(t, m, twin, "kid", 4, api.StateStandby)
	for _, f := range twin {
		if err := m.DeleteInstance(ctx, f.ID); err != nil {
			t.Fatal(err)
		}
	}

	// Capacity: three forks to Running over max_running_vms 2 are refused
	// before anything is made, though two would fit.
	_, err = m.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "run", Count: 3, TargetState: api.StateRunning})
	refusedFor(t, "a batch of 3 to Running over max_running_vms 2", err, "max_running_vms")
	batchLeftNothing(t, m, "run", 3, 1)

	// A fault once every fork's dir is renamed into place and made
	// durable, records still Forking: every dir is removed.
	m.faults = map[string]error{"fork:batch-renamed": errors.New("injected: the batch fails with every dir in place")}
	inPlace := 0
	m.faultHook = func(point string) {
		if point != "fork:batch-renamed" {
			return
		}
		ents, _ := os.ReadDir(m.layout.JailsDir())
		for _, e := range ents {
			in, err := m.db.GetInstance(ctx, e.Name())
			if err != nil || in.State != api.StateForking || !strings.HasPrefix(in.Name, "f-") {
				continue
			}
			if g, err := m.layout.Guest(in.ID); err == nil {
				if _, err := os.Stat(g.Latest().Memory()); err == nil {
					inPlace++
				}
			}
		}
	}
	_, err = m.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "f", Count: 4})
	m.faults, m.faultHook = nil, nil
	if err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("a batch failing with every dir in place: %v, want the injected error", err)
	}
	if inPlace != 4 {
		t.Fatalf("at the fault %d forks of 4 had their dir in place, want 4 (the case shows nothing)", inPlace)
	}
	batchLeftNothing(t, m, "f", 4, 1)

	// A Running source is forked live, one fork at a time: a batch is
	// refused, and makes nothing.
	action(t, m, "src", "restore")
	_, err = m.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "live", Count: 2})
	if !errors.Is(err, api.ErrInvalidState) {
		t.Errorf("a batch of a Running source: %v, want ErrInvalidState", err)
	}
	batchLeftNothing(t, m, "live", 2, 1)
	action(t, m, "src", "standby")

	// The twins of the refusals: two forks to Running fit.
	run, err := m.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "run", Count: 2, TargetState: api.StateRunning})
	if err != nil {
		t.Fatalf("a batch of 2 to Running within max_running_vms 2: %v", err)
	}
	checkBatch(t, m, run, "run", 2, api.StateRunning)
	if _, err := m.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "bad", Count: 0}); !errors.Is(err, api.ErrInvalid) {
		t.Errorf("a batch of 0: %v, want ErrInvalid", err)
	}
}
