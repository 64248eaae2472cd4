package instance

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/pager"
	"github.com/forkd/forkd/internal/version"
)

type pagerCounters struct {
	Hits, Misses, Faults uint64
	ActiveSessions       int `json:"active_sessions"`
}

func pagerStats(t *testing.T, m *Manager) pagerCounters {
	t.Helper()
	raw, err := m.PagerStats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var c pagerCounters
	if err := json.Unmarshal(raw, &c); err != nil {
		t.Fatalf("pager stats %s: %v", raw, err)
	}
	return c
}

// Forks restored through the pager share one cache key, so siblings after
// the first are served from the pager's cache; a Uffd-restored fork's
// standby then unshares and diffs like any other.
func TestUffdForkRestoresShareThePagerCache(t *testing.T) {
	needUffd(t)
	m := newTestManager(t, func(c *Config) { c.ForkRestoreBackend = api.BackendUffd })
	src := createRunning(t, m, "src")
	verifyGuest(t, m, src.ID)
	action(t, m, "src", "standby")
	var forks []api.Instance
	var after []pagerCounters
	for i := 0; i < 3; i++ {
		f := fork(t, m, "src", api.ForkRequest{Name: fmt.Sprintf("u%d", i), TargetState: api.StateRunning})
		if f.RestoreBackend != api.BackendUffd || f.State != api.StateRunning {
			t.Fatalf("fork %d: %+v; want Running via uffd", i, f)
		}
		verifyGuest(t, m, f.ID)
		forks = append(forks, f)
		after = append(after, pagerStats(t, m))
	}
	t.Logf("pager after each fork: %+v", after)
	if after[0].Misses == 0 {
		t.Fatalf("first uffd fork caused no pager misses: %+v", after[0])
	}
	if after[2].Hits <= after[0].Hits {
		t.Fatalf("sibling forks got no pager cache hits: %+v", after)
	}
	if after[2].ActiveSessions < 3 {
		t.Fatalf("active sessions %d, want 3", after[2].ActiveSessions)
	}
	// Standby of a uffd-restored fork closes its session; its next restore
	// can use either backend.
	action(t, m, forks[0].ID, "standby")
	if got := pagerStats(t, m).ActiveSessions; got != 2 {
		t.Errorf("active sessions after a fork's standby: %d, want 2", got)
	}
	in, err := m.Action(context.Background(), forks[0].ID, "restore", api.ActionRequest{RestoreBackend: api.BackendFile})
	if err != nil || in.RestoreBackend != api.BackendFile {
		t.Fatalf("file restore after uffd: %+v %v", in, err)
	}
	verifyGuest(t, m, forks[0].ID)
	in, err = m.Action(context.Background(), "src", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd})
	if err != nil {
		t.Fatal(err)
	}
	verifyGuest(t, m, src.ID)
}

// A pager that cannot start fails only Uffd restores, cleanly: the instance
// stays Standby and a File restore works.
func TestUffdRestoreWithoutPagerFailsCleanly(t *testing.T) {
	m := newTestManager(t, func(c *Config) { c.PagerBinary = "/nonexistent/forkd" })
	ctx := context.Background()
	src := createRunning(t, m, "src")
	action(t, m, "src", "standby")
	_, err := m.Action(ctx, "src", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd})
	if !errors.Is(err, api.ErrUnavailable) {
		t.Fatalf("uffd restore without a pager: %v, want ErrUnavailable", err)
	}
	in, _ := m.GetInstance(ctx, "src")
	if in.State != api.StateStandby || in.Error != "" {
		t.Fatalf("after the failed uffd restore: %s %q, want Standby (the error went to the caller, not the record)", in.State, in.Error)
	}
	action(t, m, "src", "restore")
	verifyGuest(t, m, src.ID)
}

// A pager that dies under a Uffd-restored VM: that VM shows Error (it
// freezes at its next unserved fault) and can be stopped; the next Uffd
// restore starts a new pager instead of failing until a daemon restart.
func TestPagerDeathIsReportedAndThePagerRestarts(t *testing.T) {
	needUffd(t)
	m := newTestManager(t)
	ctx := context.Background()
	for _, n := range []string{"victim", "later"} {
		createRunning(t, m, n)
		action(t, m, n, "standby")
	}
	if _, err := m.Action(ctx, "victim", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd}); err != nil {
		t.Fatal(err)
	}
	pid := pagerPid(t, m)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// The pager's exit is an event (a pidfd on its process).
	if in := waitState(t, m, "victim", api.StateError); !strings.Contains(in.Error, "pager") {
		t.Fatalf("uffd VM after its pager died: error %q; want it to name the pager", in.Error)
	}
	if in, err := m.Action(ctx, "victim", "stop", api.ActionRequest{}); err != nil || in.State != api.StateStopped {
		t.Fatalf("stop of the frozen VM: %+v %v", in, err)
	}
	later, err := m.Action(ctx, "later", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd})
	if err != nil {
		t.Fatalf("uffd restore after the pager died: %v (want a new pager)", err)
	}
	verifyGuest(t, m, later.ID)
}

// A pager restarted after the one serving a VM died answers, but never had
// that VM's session: its GET /sessions/{id} 404 must show the VM as Error,
// even when the death happened while the daemon was down (no exit event to
// see). Its twin: the VM whose session the new pager does serve is not
// condemned by the same check.
func TestRestartedPagerDoesNotHideADeadSession(t *testing.T) {
	needUffd(t)
	dir := shortDir(t)
	openAndClose(t, dir, func(m *Manager) {
		createRunning(t, m, "later")
		action(t, m, "later", "standby")
		createRunning(t, m, "victim")
		action(t, m, "victim", "standby")
		if _, err := m.Action(context.Background(), "victim", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd}); err != nil {
			t.Fatal(err)
		}
	})
	// While no daemon runs, the pager dies and a new one of the same
	// version starts (as another daemon's Uffd restore would start it).
	layout, _ := guestdir.New(dir)
	pdir, _ := layout.PagerDir(version.Version)
	old := pagerPidIn(t, pdir)
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitDead(t, old)
	ctx := context.Background()
	c, err := pager.EnsureRunning(ctx, pager.StartOptions{Binary: forkdBinary(t), Dir: pdir, Version: version.Version, CacheBytes: 1 << 20},
		slog.New(slog.NewTextHandler(testWriter{t}, nil)))
	if err != nil {
		t.Fatal(err)
	}
	// After the manager's cleanup (which drains the pager it used): a
	// pager left by a failure before that is drained here.
	t.Cleanup(func() { c.Drain(context.Background()) })

	m := newManagerAt(t, dir)
	if in := waitState(t, m, "victim", api.StateError); !strings.Contains(in.Error, "pager") {
		t.Fatalf("uffd VM whose pager died, after a new pager started: error %q; want it to name the pager", in.Error)
	}
	later, err := m.Action(ctx, "later", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd})
	if err != nil {
		t.Fatalf("uffd restore through the new pager: %v", err)
	}
	// Twin: the session check passes a VM the pager serves.
	if !m.sessionGone(ctx, version.Version, later.ID) {
		t.Fatal("sessionGone of an id the pager never had is false, want true")
	}
	rec, err := m.db.GetInstance(ctx, later.ID)
	if err != nil {
		t.Fatal(err)
	}
	if m.sessionGone(ctx, version.Version, rec.PagerSession) {
		t.Fatalf("sessionGone(%s) of a session the pager serves: true, want false", rec.PagerSession)
	}
	verifyGuest(t, m, later.ID)
	if in, _ := m.GetInstance(ctx, "later"); in.State != api.StateRunning {
		t.Fatalf("uffd VM the new pager serves: %s (error %q), want Running", in.State, in.Error)
	}
	if in, err := m.Action(ctx, "victim", "stop", api.ActionRequest{}); err != nil || in.State != api.StateStopped {
		t.Fatalf("stop of the frozen VM: %+v %v", in, err)
	}
}

// pagerPid is the pid of the manager's pager of this version, from its pid
// file.
func pagerPid(t *testing.T, m *Manager) int {
	t.Helper()
	dir, _ := m.layout.PagerDir(version.Version)
	return pagerPidIn(t, dir)
}

// pagerPidIn is the pid of the pager of pager dir dir.
func pagerPidIn(t *testing.T, dir string) int {
	t.Helper()
	b, err := os.ReadFile(pager.PidFile(dir))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("pager pid file %s: %v", pager.PidFile(dir), err)
	}
	return pid
}

// A pager that dies after a Uffd restore took its session but before the
// VM's supervisor starts watching: the watch then finds the pager started
// since, which never had the session and will not exit for this VM. The
// supervisor's first question to the pager must report the VM Error at
// once, not at a tick (set to an hour here, so only that question can).
// Found by reliability's TestPagerKilledUnderLoadIsContained; with the first
// question switched off, this test waits out its deadline with the VM
// Running.
func TestPagerDeathBeforeTheWatchIsSeen(t *testing.T) {
	needUffd(t)
	m := newTestManager(t, func(c *Config) { c.SuperviseInterval = time.Hour })
	for _, n := range []string{"victim", "other"} {
		createRunning(t, m, n)
		action(t, m, n, "standby")
	}
	var once sync.Once
	// Only victim is restored through the pager: the first supervisor to
	// reach the point is its.
	m.faultHook = func(point string) {
		if point != "supervise:pager-watch" {
			return
		}
		once.Do(func() {
			// The pager that took the session dies, and a new one of the
			// same version starts (as another Uffd restore would start it).
			dir, _ := m.layout.PagerDir(version.Version)
			old := pagerPidIn(t, dir)
			if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
				t.Error(err)
				return
			}
			waitDead(t, old)
			// The manager's cleanup drains it.
			if _, err := pager.EnsureRunning(context.Background(), pager.StartOptions{Binary: forkdBinary(t), Dir: dir, Version: version.Version, CacheBytes: 1 << 20},
				slog.New(slog.NewTextHandler(testWriter{t}, nil))); err != nil {
				t.Error(err)
			}
		})
	}
	if _, err := m.Action(context.Background(), "victim", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd}); err != nil {
		t.Fatal(err)
	}
	if in := waitState(t, m, "victim", api.StateError); !strings.Contains(in.Error, "no longer serves the session") {
		t.Fatalf("uffd VM whose pager died before the watch: error %q; want the pager not serving its session", in.Error)
	}
	if in, err := m.Action(context.Background(), "victim", "stop", api.ActionRequest{}); err != nil || in.State != api.StateStopped {
		t.Fatalf("stop of the frozen VM: %+v %v", in, err)
	}
}
