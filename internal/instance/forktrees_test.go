package instance

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/prometheus/client_golang/prometheus"
)

// withForkTrees gives the manager a pool of n empty fork trees.
func withForkTrees(n int) testOpt { return func(c *Config) { c.ForkTreePool = n } }

// pooledTrees returns the inode of every pooled tree's jail dir, by id.
func pooledTrees(t *testing.T, m *Manager) map[uint64]string {
	t.Helper()
	ents, err := os.ReadDir(m.layout.JailsDir())
	if err != nil {
		t.Fatal(err)
	}
	out := map[uint64]string{}
	for _, e := range ents {
		if id, ok := guestdir.PooledID(e.Name()); ok {
			out[inodeOf(t, filepath.Join(m.layout.JailsDir(), e.Name()))] = id
		}
	}
	return out
}

func inodeOf(t *testing.T, path string) uint64 {
	t.Helper()
	st, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Ino
}

// Forks with memory, a batch and a single fork, take the trees made ahead
// for their ids: each fork's jail is the very directory the pool made, its
// files linked into it, and its memory intact. A batch larger than the pool
// makes its own trees for the rest. The pool refills once the forks are
// done.
func TestForksTakeTheTreesMadeAhead(t *testing.T) {
	const pool = 4
	m := newTestManager(t, withForkTrees(pool))
	ctx := context.Background()
	createRunning(t, m, "src")
	src := action(t, m, "src", "standby")
	srcMem := fingerprint(t, latestMem(t, m, src.ID))
	waitUntil(t, "the pool to fill", func() bool { return m.forkTreesReady() == pool })

	before := pooledTrees(t, m)
	forks, err := m.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "kid", Count: pool + 2})
	if err != nil {
		t.Fatal(err)
	}
	checkBatch(t, m, forks, "kid", pool+2, api.StateStandby)
	took := 0
	for _, f := range forks {
		g, _ := m.guest(f.ID)
		if id, ok := before[inodeOf(t, g.Jail)]; ok {
			took++
			if id != f.ID {
				t.Errorf("fork %s lives in the tree made for id %s", f.ID, id)
			}
		}
		if got := fingerprint(t, latestMem(t, m, f.ID)); got.ino != srcMem.ino || got.sum != srcMem.sum {
			t.Errorf("fork %s does not link its source's mem-file", f.Name)
		}
	}
	if took != pool {
		t.Errorf("%d forks of a batch of %d took a tree made ahead, want the pool's %d", took, pool+2, pool)
	}

	waitUntil(t, "the pool to refill", func() bool { return m.forkTreesReady() == pool })
	before = pooledTrees(t, m)
	one, err := m.ForkInstance(ctx, "src", api.ForkRequest{Name: "single"})
	if err != nil {
		t.Fatal(err)
	}
	g, _ := m.guest(one.ID)
	if _, ok := before[inodeOf(t, g.Jail)]; !ok {
		t.Error("a single fork made its own tree while the pool held some")
	}
	for _, f := range append(forks[:1], one) {
		action(t, m, f.ID, "restore")
		verifyGuest(t, m, f.ID)
	}
}

// A fork refused after it took a tree (a bad name; a batch whose name is
// taken, refused by its first commit) leaves no tree of its own behind,
// and the pool ends full: nothing leaks.
func TestRefusedForksLeaveNoTree(t *testing.T) {
	const pool = 3
	m := newTestManager(t, withForkTrees(pool))
	ctx := context.Background()
	createRunning(t, m, "src")
	action(t, m, "src", "standby")
	if _, err := m.ForkInstance(ctx, "src", api.ForkRequest{Name: "taken"}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the pool to fill", func() bool { return m.forkTreesReady() == pool })
	if _, err := m.ForkInstance(ctx, "src", api.ForkRequest{Name: "bad/name"}); err == nil {
		t.Fatal("a fork named bad/name was made")
	}
	if _, err := m.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "taken", Count: 2}); err != nil {
		t.Fatal(err) // taken-1, taken-2: free names
	}
	if _, err := m.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "taken", Count: 3}); err == nil {
		t.Fatal("a batch over the taken names taken-1 and taken-2 was made")
	}
	waitUntil(t, "the pool to refill", func() bool { return m.forkTreesReady() == pool })
	ents, err := os.ReadDir(m.layout.JailsDir())
	if err != nil {
		t.Fatal(err)
	}
	list, _ := m.ListInstances(ctx)
	pooled, dirs := 0, 0
	for _, e := range ents {
		switch _, ok := guestdir.PooledID(e.Name()); {
		case ok:
			pooled++
		case guestdir.IsTemp(e.Name()):
			t.Errorf("a refused fork left its temp dir %s", e.Name())
		default:
			dirs++
		}
	}
	if pooled != pool || dirs != len(list) {
		t.Errorf("the jails dir holds %d pooled trees and %d guest dirs, want %d and %d (one per instance)", pooled, dirs, pool, len(list))
	}
}

// A daemon that stops without closing its pool (a crash, a power cut)
// leaves empty trees under their pooled names. The next start removes them,
// and the start guard, which refuses a store that lost its records while
// the data dir holds VMs, does not take them for VMs: a store that is
// empty because no VM was ever made starts. A temp dir in the same place
// still stops it, so the guard is live in this test.
func TestTreesLeftByACrashAreRemovedAndAreNoVMs(t *testing.T) {
	dir := shortDir(t)
	openAndClose(t, dir, func(m *Manager) {}) // an empty store and its layout
	l, err := guestdir.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	plant := func(g guestdir.Guest, err error) string {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		if err := makeForkTree(g, true); err != nil {
			t.Fatal(err)
		}
		return g.Jail
	}
	left := []string{plant(l.PooledGuest(newID())), plant(l.PooledGuest(newID()))}
	m, err := newManagerErr(t, dir)
	if err != nil {
		t.Fatalf("a start over an empty store and pooled trees was refused: %v", err)
	}
	for _, p := range left {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Errorf("the pooled tree %s left by a crash is still there (%v)", p, err)
		}
	}
	m.Close()
	tmp := plant(l.TempGuest(newID()))
	if m, err := newManagerErr(t, dir); err == nil {
		m.Close()
		t.Fatalf("a start over an empty store and a temp dir %s was not refused: the guard this test relies on is off", tmp)
	}
}

// The pool's trees are on disk and counted by forkd_fork_trees_ready, and
// Close removes every one of them.
func TestClosingTheManagerRemovesItsTrees(t *testing.T) {
	dir := shortDir(t)
	reg := prometheus.NewRegistry()
	m, err := newManagerErr(t, dir, withForkTrees(5), func(c *Config) { c.Registerer = reg })
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the pool to fill", func() bool { return m.forkTreesReady() == 5 })
	if n := len(pooledTrees(t, m)); n != 5 {
		t.Fatalf("%d pooled trees on disk, want 5", n)
	}
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	ready := -1.0
	for _, f := range fams {
		if f.GetName() == "forkd_fork_trees_ready" {
			ready = f.GetMetric()[0].GetGauge().GetValue()
		}
	}
	if ready != 5 {
		t.Errorf("forkd_fork_trees_ready = %v, want 5", ready)
	}
	m.Close()
	if n := len(pooledTrees(t, m)); n != 0 {
		t.Errorf("%d pooled trees left after Close", n)
	}
}
