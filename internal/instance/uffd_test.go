package instance

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/forkd/forkd/internal/api"
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
	waitDead(t, pid)
	in, err := m.GetInstance(ctx, "victim")
	if err != nil || in.State != api.StateError || !strings.Contains(in.Error, "pager") {
		t.Fatalf("uffd VM after its pager died: %+v %v; want Error naming the pager", in, err)
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

// A pager restarted (by another Uffd restore) after the one serving a VM
// died answers, but never had that VM's session: its GET /sessions/{id}
// 404 must still show the VM as Error. Its twin: the VM whose session the
// new pager does serve is not condemned by the same check.
func TestRestartedPagerDoesNotHideADeadSession(t *testing.T) {
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
	waitDead(t, pid)
	// Restore through the pager before anything looks at the victim: this
	// starts the new pager.
	later, err := m.Action(ctx, "later", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd})
	if err != nil {
		t.Fatalf("uffd restore after the pager died: %v (want a new pager)", err)
	}
	in, err := m.GetInstance(ctx, "victim")
	if err != nil || in.State != api.StateError || !strings.Contains(in.Error, "pager") {
		t.Fatalf("uffd VM whose pager died, after a new pager started: %+v %v; want Error naming the pager", in, err)
	}
	if in, err := m.GetInstance(ctx, "later"); err != nil || in.State != api.StateRunning {
		t.Fatalf("uffd VM the new pager serves: %+v %v; want Running", in, err)
	}
	verifyGuest(t, m, later.ID)
	if in, err := m.Action(ctx, "victim", "stop", api.ActionRequest{}); err != nil || in.State != api.StateStopped {
		t.Fatalf("stop of the frozen VM: %+v %v", in, err)
	}
}

// pagerPid is the pid of the manager's pager of this version, from its pid
// file.
func pagerPid(t *testing.T, m *Manager) int {
	t.Helper()
	dir, _ := m.layout.PagerDir(version.Version)
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
