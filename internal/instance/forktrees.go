package instance

import (
	"os"

	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/forkd/forkd/internal/forktree"
	"github.com/forkd/forkd/internal/guestdir"
)

// The pool of empty fork trees (forktree): a fork with memory that is not
// live takes a tree made ahead for its id, under guestdir's PooledGuest
// name, builds in it instead of in its TempGuest, and renames it into place
// the same way. Its journal and durability are those of a fork that made its
// own tree: the rename's fsync carries the tree on XFS, and syncForkTree
// fsyncs every directory of it elsewhere. A tree left by a daemon that did
// not close its pool holds no file and no VM: the reconciler removes it,
// and the start guard never counts it as a VM's.

// treeMaker makes and removes the pooled tree of a fork id.
type treeMaker struct{ layout guestdir.Layout }

func (t treeMaker) Make(id string) error {
	g, err := t.layout.PooledGuest(id)
	if err != nil {
		return err
	}
	return makeForkTree(g, true)
}

// Settle makes the trees made so far durable with one fsync of the
// directory that holds them. On XFS that one log force carries every
// directory made before it; elsewhere it carries at least the trees' own
// names, and a fork still fsyncs every directory of its tree itself
// (syncForkTree): settling is for speed, never for a fork's durability.
func (t treeMaker) Settle() error { return atomicfile.SyncDir(t.layout.JailsDir()) }

func (t treeMaker) Remove(id string) error {
	g, err := t.layout.PooledGuest(id)
	if err != nil {
		return err
	}
	return os.RemoveAll(g.Jail)
}

// makeForkTree makes the empty directories of the fork tree g: its jail,
// the jail's root and, for a fork with memory, snapshots/snapshot-latest,
// one level at a time (each is new, so there is nothing for MkdirAll to
// look up first).
func makeForkTree(g guestdir.Guest, withMemory bool) error {
	if err := os.Mkdir(g.Jail, 0o700); err != nil {
		return err
	}
	dirs := []string{g.Dir}
	if withMemory {
		dirs = append(dirs, g.SnapshotsDir(), g.Latest().Dir)
	}
	for _, d := range dirs {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
	}
	return nil
}

// startForkTrees starts the pool, once the reconciler has removed what an
// earlier run left.
func (m *Manager) startForkTrees() {
	if m.cfg.ForkTreePool > 0 {
		m.trees = forktree.New(m.cfg.ForkTreePool, treeMaker{m.layout}, newID, m.log)
	}
}

// closeForkTrees removes the trees the pool holds.
func (m *Manager) closeForkTrees() {
	if m.trees != nil {
		m.trees.Close()
	}
}

// treeOpStart marks a fork call in flight: the pool refills, and settles
// what it made (treeMaker.Settle), only once none is, so its directory
// work never lands in a fork's log force.
func (m *Manager) treeOpStart() func() {
	if m.trees == nil {
		return func() {}
	}
	return m.trees.Busy()
}

// forkIDs draws the ids of n forks. For forks with memory that are not
// live (withTree), the first pooled of them come with their trees made.
func (m *Manager) forkIDs(n int, withTree bool) (ids []string, pooled int) {
	if withTree && m.trees != nil {
		ids = m.trees.Take(n)
	}
	pooled = len(ids)
	for len(ids) < n {
		ids = append(ids, newID())
	}
	return ids, pooled
}

// returnTrees gives the pool back trees taken for forks that never built
// in them (an admission or a request refused first).
func (m *Manager) returnTrees(ids []string) {
	if m.trees != nil && len(ids) > 0 {
		m.trees.Put(ids)
	}
}

// forkTreesReady is how many empty fork trees the pool holds now (tests
// and metrics).
func (m *Manager) forkTreesReady() int {
	if m.trees == nil {
		return 0
	}
	return m.trees.Ready()
}
