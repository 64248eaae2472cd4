package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// forkUnit is what a fork writes in one group: its journal entry, finished,
// and its record.
func forkUnit(id, name string) func(tx *Tx) error {
	return func(tx *Tx) error {
		op, err := tx.Begin("fork", id, map[string]string{"source": "src"})
		if err != nil {
			return err
		}
		if err := tx.CreateInstance(Instance{ID: id, Name: name, State: "Standby", Vcpus: 1, MemoryMiB: 32}); err != nil {
			return err
		}
		if err := tx.Step(op, "committed", nil); err != nil {
			return err
		}
		return tx.Finish(op, "done")
	}
}

func openWith(t *testing.T, path string, opts Options) *Store {
	t.Helper()
	s, err := OpenWith(context.Background(), path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestConcurrentUnitsShareOneCommit(t *testing.T) {
	const n = 5
	path := filepath.Join(t.TempDir(), "forkd.db")
	s := openWith(t, path, Options{MinGroup: n})
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			errs[i] = s.Group(context.Background(), "fork", forkUnit(fmt.Sprint("id", i), fmt.Sprint("kid", i)))
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("unit %d: %v", i, err)
		}
	}
	if groups, units := s.GroupCommits(); groups != 1 || units != n {
		t.Fatalf("GroupCommits = %d groups, %d units; want 1 group of %d", groups, units, n)
	}
	s.Close()
	s = openWith(t, path, Options{})
	list, err := s.ListInstances(context.Background())
	if err != nil || len(list) != n {
		t.Fatalf("after reopen: %d instances, %v; want %d", len(list), err, n)
	}
	if open, _ := s.OpenEntries(context.Background()); len(open) != 0 {
		t.Fatalf("open journal entries after committed units: %+v", open)
	}
}

func TestAFailingUnitRollsBackOnlyItself(t *testing.T) {
	path := filepath.Join(t.TempDir(), "forkd.db")
	s := openWith(t, path, Options{MinGroup: 3})
	ctx := context.Background()
	if err := s.CreateInstance(ctx, Instance{ID: "taken", Name: "kid1", State: "Standby", Vcpus: 1, MemoryMiB: 32}); err != nil {
		t.Fatal(err)
	}
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i := range 3 {
		// kid1's name is taken: its journal begin must go with its insert.
		wg.Go(func() { errs[i] = s.Group(ctx, "fork", forkUnit(fmt.Sprint("id", i), fmt.Sprint("kid", i))) })
	}
	wg.Wait()
	if errs[0] != nil || errs[2] != nil || !errors.Is(errs[1], ErrExists) {
		t.Fatalf("unit errors %v; want nil, ErrExists, nil", errs)
	}
	entries, _ := s.Entries(ctx, 10)
	for _, e := range entries {
		if e.Subject == "id1" {
			t.Fatalf("the failed unit's journal entry was committed: %+v", e)
		}
	}
	if len(entries) != 2 {
		t.Fatalf("%d journal entries, want the 2 of the units that succeeded", len(entries))
	}
	for _, id := range []string{"id0", "id2"} {
		if _, err := s.GetInstance(ctx, id); err != nil {
			t.Errorf("unit %s: %v", id, err)
		}
	}
	if groups, _ := s.GroupCommits(); groups != 1 {
		t.Fatalf("%d groups, want 1", groups)
	}
}

func TestGroupAfterCloseIsErrClosed(t *testing.T) {
	s, _ := openTemp(t)
	s.Close()
	if err := s.Group(context.Background(), "fork", forkUnit("a", "b")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Group after Close: %v, want ErrClosed", err)
	}
}

func TestCloseAnswersUnitsStillQueued(t *testing.T) {
	path := filepath.Join(t.TempDir(), "forkd.db")
	// The committer holds the first unit waiting for a second that never comes.
	s := openWith(t, path, Options{MinGroup: 2, MinGroupWait: time.Hour})
	done := make(chan error, 1)
	go func() { done <- s.Group(context.Background(), "fork", forkUnit("a", "b")) }()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		s.group.mu.Lock()
		n := len(s.group.pending)
		s.group.mu.Unlock()
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the unit never reached the queue")
		}
	}
	s.Close()
	// Closing takes what is pending and commits it: the unit is durable.
	if err := <-done; err != nil && !errors.Is(err, ErrClosed) {
		t.Fatalf("queued unit at Close: %v, want nil or ErrClosed", err)
	}
}

func TestAUnitWhoseContextEndedIsDropped(t *testing.T) {
	path := filepath.Join(t.TempDir(), "forkd.db")
	s := openWith(t, path, Options{MinGroup: 2})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	errs := make([]error, 2)
	var wg sync.WaitGroup
	wg.Go(func() { errs[0] = s.Group(ctx, "fork", forkUnit("a", "a")) })
	wg.Go(func() { errs[1] = s.Group(context.Background(), "fork", forkUnit("b", "b")) })
	wg.Wait()
	if !errors.Is(errs[0], context.Canceled) || errs[1] != nil {
		t.Fatalf("errors %v; want Canceled for the dropped unit, nil for the other", errs)
	}
	if _, err := s.GetInstance(context.Background(), "a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the dropped unit's record: %v, want ErrNotFound", err)
	}
}

// Crash tests: a child process writes a group of 3 forks and is SIGKILLed
// before or after the group's COMMIT; the parent reopens the database and
// finds all 3 or none, never some, and never a fork's record without its
// journal entry or the reverse.
const (
	groupChildEnv = "FORKD_STORE_GROUP_CHILD"
	groupDBEnv    = "FORKD_STORE_GROUP_DB"
)

func TestMain(m *testing.M) {
	if when := os.Getenv(groupChildEnv); when != "" {
		os.Exit(groupChild(when, os.Getenv(groupDBEnv)))
	}
	os.Exit(m.Run())
}

func groupChild(when, path string) int {
	kill := func() {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
	opts := Options{MinGroup: 3}
	switch when {
	case "before-commit":
		opts.BeforeCommit = func([]string) { kill() }
	case "panic-before-commit":
		opts.BeforeCommit = func([]string) { panic("a hook's bug") }
	case "panic-in-unit", "panic-in-unsynced-unit":
		s, err := OpenWith(context.Background(), path, Options{})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		group := s.Group
		if when == "panic-in-unsynced-unit" {
			group = s.GroupUnsynced
		}
		group(context.Background(), "fork", func(*Tx) error { panic("a unit's bug") })
		return 3 // never reached: the panic ends the process
	}
	s, err := OpenWith(context.Background(), path, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Go(func() {
			if err := s.Group(context.Background(), "fork", forkUnit("id"+strconv.Itoa(i), "kid"+strconv.Itoa(i))); err != nil {
				fmt.Fprintln(os.Stderr, err)
			}
		})
	}
	wg.Wait()
	if when == "after-commit" {
		kill()
	}
	return 3 // never reached: the hook kills first
}

func TestACrashLosesAGroupWholeOrKeepsItWhole(t *testing.T) {
	for when, want := range map[string]int{"before-commit": 0, "after-commit": 3} {
		t.Run(when, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "forkd.db")
			cmd := exec.Command(os.Args[0], "-test.run", "^$")
			cmd.Env = append(os.Environ(), groupChildEnv+"="+when, groupDBEnv+"="+path)
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("child: %v, want killed by SIGKILL\n%s", err, out)
			}
			s := openWith(t, path, Options{})
			ctx := context.Background()
			list, _ := s.ListInstances(ctx)
			entries, _ := s.Entries(ctx, 10)
			if len(list) != want || len(entries) != want {
				t.Fatalf("after a crash %s: %d records, %d journal entries; want %d of each", when, len(list), len(entries), want)
			}
			for _, e := range entries {
				if e.FinishedAt.IsZero() || e.Step != "committed" {
					t.Errorf("journal entry %+v: want finished at committed, as its unit wrote it", e)
				}
			}
		})
	}
}

// TestAPanicInAGroupCrashesInsteadOfHanging: a bug that panics inside a
// group commit (a unit's function, synced or not, or the BeforeCommit hook)
// ends the process, whose journal the next start reconciles, instead of
// leaving it hung forever with its writer connection held by the group's
// transaction (which deferred restores and closes of the connection then
// waited for). The child must die of the panic within the time given.
func TestAPanicInAGroupCrashesInsteadOfHanging(t *testing.T) {
	for _, when := range []string{"panic-in-unit", "panic-in-unsynced-unit", "panic-before-commit"} {
		t.Run(when, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "forkd.db")
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run", "^$")
			cmd.Env = append(os.Environ(), groupChildEnv+"="+when, groupDBEnv+"="+path)
			out, err := cmd.CombinedOutput()
			if ctx.Err() != nil {
				t.Fatalf("the child hung after the panic (killed after 30 s)\n%s", out)
			}
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "bug") {
				t.Fatalf("child: %v, want it to die of the panic (exit 2)\n%s", err, out)
			}
		})
	}
}

func TestAnUnsyncedGroupIsVisibleAndLeavesTheDatabaseFull(t *testing.T) {
	path := filepath.Join(t.TempDir(), "forkd.db")
	s := openWith(t, path, Options{})
	ctx := context.Background()
	if err := s.GroupUnsynced(ctx, "fork", forkUnit("a", "a")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetInstance(ctx, "a"); err != nil {
		t.Fatalf("an unsynced unit's record is not visible at return: %v", err)
	}
	// The one connection is back to FULL for every other commit.
	var sync int
	if err := s.db.QueryRowContext(ctx, `PRAGMA synchronous`).Scan(&sync); err != nil || sync != 2 {
		t.Fatalf("synchronous after an unsynced group = %d, %v; want 2 (FULL)", sync, err)
	}
	if err := s.Group(ctx, "fork", forkUnit("b", "b")); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = openWith(t, path, Options{})
	if list, _ := s.ListInstances(ctx); len(list) != 2 {
		t.Fatalf("after reopen: %d instances, want 2", len(list))
	}
}

// gatedUnit is forkUnit for GroupAfter: ran is closed once its statements
// have run, before its go-ahead.
func gatedUnit(id, name string, ran chan struct{}) func(tx *Tx) error {
	return func(tx *Tx) error {
		defer close(ran)
		return forkUnit(id, name)(tx)
	}
}

// A GroupAfter unit's statements run at once, but nothing of it is visible
// or durable before its go-ahead, nor of a unit queued behind it; the
// go-ahead commits both.
func TestGroupAfterCommitsOnlyOnItsGoAhead(t *testing.T) {
	ctx := context.Background()
	s := openWith(t, filepath.Join(t.TempDir(), "forkd.db"), Options{})
	ready, ran, done := make(chan error, 1), make(chan struct{}), make(chan error, 1)
	go func() { done <- s.GroupAfter(ctx, "fork", After{Ready: ready}, gatedUnit("a", "kid-a", ran)) }()
	<-ran
	behind := make(chan error, 1)
	go func() { behind <- s.Group(ctx, "fork", forkUnit("b", "kid-b")) }()
	time.Sleep(50 * time.Millisecond) // time for a wrong committer to commit either
	if _, err := s.GetInstance(ctx, "a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the gated unit's record before its go-ahead: %v, want ErrNotFound", err)
	}
	select {
	case err := <-done:
		t.Fatalf("GroupAfter returned %v before its go-ahead", err)
	case err := <-behind:
		t.Fatalf("a unit queued behind a gated one returned %v before the go-ahead", err)
	default:
	}
	ready <- nil
	if err := <-done; err != nil {
		t.Fatalf("GroupAfter after its go-ahead: %v", err)
	}
	if err := <-behind; err != nil {
		t.Fatalf("the unit behind it: %v", err)
	}
	for _, id := range []string{"a", "b"} {
		if _, err := s.GetInstance(ctx, id); err != nil {
			t.Errorf("instance %s after the go-ahead: %v", id, err)
		}
	}
}

// An error for a go-ahead rolls back the gated unit alone: the unit that
// shares its group commits, and GroupAfter returns the error.
func TestGroupAfterRollsBackItsUnitAloneOnError(t *testing.T) {
	ctx := context.Background()
	s := openWith(t, filepath.Join(t.TempDir(), "forkd.db"), Options{MinGroup: 2, MinGroupWait: time.Minute})
	first := make(chan error, 1)
	go func() { first <- s.Group(ctx, "fork", forkUnit("b", "kid-b")) }()
	for queued := 0; queued == 0; time.Sleep(time.Millisecond) { // "b" first in the group
		s.group.mu.Lock()
		queued = len(s.group.pending)
		s.group.mu.Unlock()
	}
	groups, units := s.GroupCommits()
	failed := errors.New("the renames failed")
	ready, ran := make(chan error, 1), make(chan struct{})
	ready <- failed
	if err := s.GroupAfter(ctx, "fork", After{Ready: ready}, gatedUnit("a", "kid-a", ran)); !errors.Is(err, failed) {
		t.Fatalf("GroupAfter with a failed go-ahead: %v, want its error", err)
	}
	if err := <-first; err != nil {
		t.Fatalf("the unit in the same group: %v", err)
	}
	if g, u := s.GroupCommits(); g != groups+1 || u != units+1 {
		t.Errorf("groups %d → %d, units %d → %d: want one group committing one unit", groups, g, units, u)
	}
	if _, err := s.GetInstance(ctx, "a"); !errors.Is(err, ErrNotFound) {
		t.Errorf("the rolled back unit's record: %v, want ErrNotFound", err)
	}
	if _, err := s.GetInstance(ctx, "b"); err != nil {
		t.Errorf("the other unit's record: %v", err)
	}
}
