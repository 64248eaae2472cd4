package forktree

import (
	"log/slog"
	"sync"
)

// Maker makes and removes the empty tree of a fork id, and settles the
// trees it made: makes them durable, so that no later fsync carries them.
type Maker interface {
	Make(id string) error
	Remove(id string) error
	Settle() error
}

// Pool holds up to Size trees, each made for an id of its own.
type Pool struct {
	size  int
	mk    Maker
	newID func() string
	log   *slog.Logger

	mu     sync.Mutex
	ready  []string // ids whose trees are made; guarded by mu
	busy   int      // operations in flight (Busy); guarded by mu
	closed bool     // guarded by mu

	kick chan struct{} // wakes the refill loop
	stop chan struct{} // closed by Close
	done chan struct{} // closed when the refill loop has returned
}

// New starts a pool of size trees made by mk for ids drawn by newID, and
// starts filling it. A size of 0 or less gives a pool that holds none.
func New(size int, mk Maker, newID func() string, log *slog.Logger) *Pool {
	if log == nil {
		log = slog.Default()
	}
	p := &Pool{size: max(size, 0), mk: mk, newID: newID, log: log,
		kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go p.loop()
	p.refill()
	return p
}

// Take hands out up to n ids whose trees are made, fewer (or none) when
// the pool holds fewer. Each is the caller's from here on: it uses the tree,
// gives it back untouched (Put), or removes it.
func (p *Pool) Take(n int) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	n = min(n, len(p.ready))
	if n <= 0 {
		return nil
	}
	ids := append([]string(nil), p.ready[len(p.ready)-n:]...)
	p.ready = p.ready[:len(p.ready)-n]
	return ids
}

// Put gives back ids taken and not used, their trees untouched. A tree the
// pool has no room for, or any once it is closed, is removed.
func (p *Pool) Put(ids []string) {
	p.mu.Lock()
	var extra []string
	for _, id := range ids {
		if p.closed || len(p.ready) >= p.size {
			extra = append(extra, id)
			continue
		}
		p.ready = append(p.ready, id)
	}
	p.mu.Unlock()
	p.remove(extra)
}

// Ready is how many trees the pool holds now.
func (p *Pool) Ready() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ready)
}

// Busy marks an operation that may take trees as in flight; the pool makes
// none until every such operation has called the func it returns, and
// then refills.
func (p *Pool) Busy() func() {
	p.mu.Lock()
	p.busy++
	p.mu.Unlock()
	return sync.OnceFunc(func() {
		p.mu.Lock()
		p.busy--
		p.mu.Unlock()
		p.refill()
	})
}

// Close stops refilling, waits for a tree being made, and removes every
// tree the pool holds. Trees taken and not given back are their takers'.
func (p *Pool) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	p.mu.Unlock()
	close(p.stop)
	<-p.done
	p.mu.Lock()
	ids := p.ready
	p.ready = nil
	p.mu.Unlock()
	p.remove(ids)
}

// refill wakes the loop (never blocks).
func (p *Pool) refill() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// loop makes trees, one at a time, while the pool is short of Size and no
// operation is in flight; a tree it cannot make ends the round (logged),
// and the next Busy operation's end starts another. A round that made
// trees and ends with none in flight settles them (settle).
func (p *Pool) loop() {
	defer close(p.done)
	for {
		select {
		case <-p.stop:
			return
		case <-p.kick:
		}
		made := 0
		for p.wants() {
			id := p.newID()
			if err := p.mk.Make(id); err != nil {
				p.log.Warn("fork tree pool: make a tree", "id", id, "err", err)
				p.remove([]string{id}) // whatever part of it was made
				break
			}
			p.mu.Lock()
			keep := !p.closed && len(p.ready) < p.size
			if keep {
				p.ready = append(p.ready, id)
			}
			p.mu.Unlock()
			if !keep { // closed meanwhile
				p.remove([]string{id})
				break
			}
			made++
		}
		if made > 0 {
			p.settle()
		}
	}
}

// settle has the Maker make the trees of a round durable, unless an
// operation is in flight: a tree made and never synced waits in the
// filesystem's log for the next fsync of anything, and that would be a
// fork's, which would then carry a round's directories (a fork right after
// a batch of 25 took 0.4-0.7 ms more). An operation in flight makes its own
// log force, which carries them anyway: settling then would only compete.
func (p *Pool) settle() {
	p.mu.Lock()
	idle := !p.closed && p.busy == 0
	p.mu.Unlock()
	if !idle {
		return
	}
	if err := p.mk.Settle(); err != nil {
		p.log.Warn("fork tree pool: settle the trees made", "err", err)
	}
}

// wants reports whether the loop should make another tree now.
func (p *Pool) wants() bool {
	select {
	case <-p.stop:
		return false
	default:
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.closed && p.busy == 0 && len(p.ready) < p.size
}

// remove removes the trees of ids, logging any it cannot.
func (p *Pool) remove(ids []string) {
	for _, id := range ids {
		if err := p.mk.Remove(id); err != nil {
			p.log.Warn("fork tree pool: remove a tree", "id", id, "err", err)
		}
	}
}
