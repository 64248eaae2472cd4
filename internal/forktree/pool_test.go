package forktree

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// dirMaker makes each id's tree as a real directory with one below it, as
// forkd's trees are, and can be told to fail.
type dirMaker struct {
	root    string
	fail    atomic.Bool
	made    atomic.Int64
	block   chan struct{} // when set, Make says so on entered and waits on it
	entered chan struct{}
	// settles counts Settle calls; settledMade is how many trees had been
	// made at the last one.
	settles, settledMade atomic.Int64
}

func (d *dirMaker) Make(id string) error {
	if d.block != nil {
		d.entered <- struct{}{}
		<-d.block
	}
	if d.fail.Load() {
		return errors.New("no room")
	}
	if err := os.Mkdir(filepath.Join(d.root, id), 0o700); err != nil {
		return err
	}
	d.made.Add(1)
	return os.Mkdir(filepath.Join(d.root, id, "root"), 0o755)
}

func (d *dirMaker) Remove(id string) error { return os.RemoveAll(filepath.Join(d.root, id)) }

func (d *dirMaker) Settle() error {
	d.settledMade.Store(d.made.Load())
	d.settles.Add(1)
	return nil
}

func (d *dirMaker) trees(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir(d.root)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func ids() func() string {
	var n atomic.Int64
	return func() string { return fmt.Sprintf("id%03d", n.Add(1)) }
}

// waitReady waits for the pool to hold n trees.
func waitReady(t *testing.T, p *Pool, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for p.Ready() != n {
		if time.Now().After(deadline) {
			t.Fatalf("pool holds %d trees, want %d", p.Ready(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestAPoolFillsHandsOutEachTreeOnceAndRefills(t *testing.T) {
	d := &dirMaker{root: t.TempDir()}
	p := New(4, d, ids(), nil)
	defer p.Close()
	waitReady(t, p, 4)
	if got := d.trees(t); len(got) != 4 {
		t.Fatalf("trees on disk: %v, want 4", got)
	}
	done := p.Busy()
	a, b := p.Take(3), p.Take(3)
	if len(a) != 3 || len(b) != 1 || p.Take(1) != nil {
		t.Fatalf("Take(3), Take(3) = %v, %v from a pool of 4", a, b)
	}
	seen := map[string]bool{}
	for _, id := range append(a, b...) {
		if seen[id] {
			t.Fatalf("tree %s handed out twice", id)
		}
		seen[id] = true
		if _, err := os.Stat(filepath.Join(d.root, id, "root")); err != nil {
			t.Errorf("a handed-out tree is not made: %v", err)
		}
	}
	// No refill while an operation is in flight...
	time.Sleep(20 * time.Millisecond)
	if p.Ready() != 0 || d.made.Load() != 4 {
		t.Fatalf("the pool refilled during an operation: %d ready, %d made", p.Ready(), d.made.Load())
	}
	// ...and a full one once it ends, with new ids.
	done()
	done() // a second call changes nothing
	waitReady(t, p, 4)
	for _, id := range p.Take(4) {
		if seen[id] {
			t.Fatalf("id %s drawn again after it was handed out", id)
		}
	}
}

func TestPutKeepsUntouchedTreesAndRemovesWhatHasNoRoom(t *testing.T) {
	d := &dirMaker{root: t.TempDir()}
	p := New(2, d, ids(), nil)
	defer p.Close()
	waitReady(t, p, 2)
	done := p.Busy()
	got := p.Take(2)
	p.Put(got[:1])
	if p.Ready() != 1 {
		t.Fatalf("Put gave back 1 tree: the pool holds %d", p.Ready())
	}
	done()
	waitReady(t, p, 2)
	p.Put(got[1:]) // no room: removed
	if _, err := os.Stat(filepath.Join(d.root, got[1])); !os.IsNotExist(err) {
		t.Errorf("a tree put back into a full pool is still there (%v)", err)
	}
	if p.Ready() != 2 {
		t.Errorf("the pool holds %d trees, want its 2", p.Ready())
	}
}

func TestClosingRemovesEveryTreeThePoolHolds(t *testing.T) {
	d := &dirMaker{root: t.TempDir()}
	p := New(5, d, ids(), nil)
	waitReady(t, p, 5)
	taken := p.Take(1)
	p.Close()
	p.Close() // twice is fine
	if got := d.trees(t); len(got) != 1 || got[0] != taken[0] {
		t.Errorf("after Close the trees left are %v, want only the taken %v (its taker's)", got, taken)
	}
	p.Put(taken) // closed: removed
	if got := d.trees(t); len(got) != 0 {
		t.Errorf("a tree put back after Close is left: %v", got)
	}
}

func TestCloseWaitsForATreeBeingMadeAndRemovesIt(t *testing.T) {
	d := &dirMaker{root: t.TempDir(), block: make(chan struct{}), entered: make(chan struct{}, 1)}
	p := New(3, d, ids(), nil)
	<-d.entered
	closed := make(chan struct{})
	go func() { p.Close(); close(closed) }()
	select {
	case <-closed:
		t.Fatal("Close returned while a tree was being made")
	case <-time.After(20 * time.Millisecond):
	}
	close(d.block)
	<-closed
	if got := d.trees(t); len(got) != 0 {
		t.Errorf("trees left after Close: %v", got)
	}
}

func TestATreeThatCannotBeMadeEndsTheRoundAndLeavesNothing(t *testing.T) {
	d := &dirMaker{root: t.TempDir()}
	d.fail.Store(true)
	p := New(3, d, ids(), nil)
	defer p.Close()
	time.Sleep(20 * time.Millisecond)
	if p.Ready() != 0 || len(d.trees(t)) != 0 {
		t.Fatalf("a failing maker left %d ready, %v on disk", p.Ready(), d.trees(t))
	}
	d.fail.Store(false)
	p.Busy()() // the next operation's end tries again
	waitReady(t, p, 3)
}

func TestConcurrentTakersNeverShareATree(t *testing.T) {
	d := &dirMaker{root: t.TempDir()}
	p := New(64, d, ids(), nil)
	defer p.Close()
	waitReady(t, p, 64)
	defer p.Busy()() // no refill until every taker is done
	var mu sync.Mutex
	seen := map[string]int{}
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			done := p.Busy()
			defer done()
			for _, id := range p.Take(5) {
				mu.Lock()
				seen[id]++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(seen) != 64 {
		t.Errorf("16 takers of 5 from 64 got %d distinct trees, want all 64", len(seen))
	}
	for id, n := range seen {
		if n != 1 {
			t.Errorf("tree %s handed out %d times", id, n)
		}
	}
}

func TestAPoolOfNoneHoldsNone(t *testing.T) {
	d := &dirMaker{root: t.TempDir()}
	p := New(0, d, ids(), nil)
	defer p.Close()
	p.Busy()()
	time.Sleep(10 * time.Millisecond)
	if p.Take(3) != nil || d.made.Load() != 0 {
		t.Error("a pool of size 0 made or handed out trees")
	}
}

// A round of trees is settled once it is made, so that the next fork's
// fsync does not carry it; a round an operation cuts short is not (that
// operation's own log force carries its trees), and the round that
// completes it after the operation is.
func TestARoundOfTreesIsSettledOnceMadeAndNeverDuringAnOperation(t *testing.T) {
	d := &dirMaker{root: t.TempDir(), block: make(chan struct{}), entered: make(chan struct{}, 1)}
	p := New(3, d, ids(), nil)
	defer p.Close()
	makeOne := func() { <-d.entered; d.block <- struct{}{} }
	waitSettles := func(n int64) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for d.settles.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("%d settles after 10 s, want %d", d.settles.Load(), n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	for range 3 {
		makeOne()
	}
	waitSettles(1)
	if got := d.settledMade.Load(); got != 3 {
		t.Fatalf("the first round settled with %d trees made, want all 3", got)
	}

	done := p.Busy()
	p.Take(2)
	done() // a round of 2 starts...
	<-d.entered
	inFlight := p.Busy() // ...and an operation starts during its first tree
	d.block <- struct{}{}
	time.Sleep(20 * time.Millisecond)
	if got := d.settles.Load(); got != 1 {
		t.Fatalf("the pool settled %d times, the last during an operation in flight; want only the first round's", got)
	}
	if p.Ready() != 2 {
		t.Fatalf("the pool holds %d trees, want 2 (one made before the operation began)", p.Ready())
	}
	inFlight() // the round is completed, and settled
	makeOne()
	waitSettles(2)
	if got := d.settledMade.Load(); got != 5 {
		t.Fatalf("the second settle came with %d trees made, want 5", got)
	}
}
