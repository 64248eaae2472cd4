package image

import (
	"crypto/rand"
	"encoding/hex"
	"sort"
	"sync"
	"time"
)

// Pull states.
const (
	PullRunning   = "running"
	PullSucceeded = "succeeded"
	PullFailed    = "failed"
)

// pullKeep is how long a finished pull stays visible to a client polling
// it, and pullKeepMax how many finished ones are kept at most.
const (
	pullKeep    = 10 * time.Minute
	pullKeepMax = 256
)

// PullStatus is a snapshot of one pull operation, for a client polling it.
type PullStatus struct {
	ID         string
	Ref        string
	Platform   string
	State      string
	Progress   Progress
	Image      *Image // when succeeded
	Err        error  // when failed
	StartedAt  time.Time
	FinishedAt time.Time
}

type pullOp struct {
	mu sync.Mutex // guards st
	st PullStatus
}

func (p *pullOp) status() PullStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.st
}

// StartPull starts pulling ref in the background and returns at once; the
// client polls PullStatus with the returned id. A pull of the same
// reference and platform already running is returned instead of a second
// one. Errors of the reference itself are returned here, synchronously.
func (s *Store) StartPull(ref, platform string) (PullStatus, error) {
	r, err := ParseRef(ref)
	if err != nil {
		return PullStatus{}, err
	}
	if platform == "" {
		platform = DefaultPlatform()
	}
	if _, err := ParsePlatform(platform); err != nil {
		return PullStatus{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.prunePullsLocked(time.Now())
	for _, op := range s.pulls {
		if st := op.status(); st.State == PullRunning && st.Ref == r.String() && st.Platform == platform {
			return st, nil
		}
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	op := &pullOp{st: PullStatus{ID: hex.EncodeToString(b[:]), Ref: r.String(), Platform: platform,
		State: PullRunning, Progress: Progress{Phase: PhaseResolving}, StartedAt: time.Now().UTC()}}
	s.pulls[op.st.ID] = op
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		im, err := s.Pull(s.ctx, ref, platform, func(p Progress) {
			op.mu.Lock()
			op.st.Progress = p
			op.mu.Unlock()
		})
		op.mu.Lock()
		defer op.mu.Unlock()
		op.st.FinishedAt = time.Now().UTC()
		if err != nil {
			op.st.State, op.st.Err = PullFailed, err
			return
		}
		op.st.State, op.st.Image = PullSucceeded, &im
	}()
	return op.st, nil
}

// Status returns a pull operation by id.
func (s *Store) Status(id string) (PullStatus, bool) {
	s.mu.Lock()
	op, ok := s.pulls[id]
	s.mu.Unlock()
	if !ok {
		return PullStatus{}, false
	}
	return op.status(), true
}

// prunePullsLocked forgets finished pulls older than pullKeep, and the
// oldest finished ones beyond pullKeepMax. s.mu is held.
func (s *Store) prunePullsLocked(now time.Time) {
	var done []PullStatus
	for id, op := range s.pulls {
		st := op.status()
		if st.State == PullRunning {
			continue
		}
		if now.Sub(st.FinishedAt) > pullKeep {
			delete(s.pulls, id)
			continue
		}
		done = append(done, st)
	}
	if len(done) <= pullKeepMax {
		return
	}
	sort.Slice(done, func(i, j int) bool { return done[i].FinishedAt.Before(done[j].FinishedAt) })
	for _, st := range done[:len(done)-pullKeepMax] {
		delete(s.pulls, st.ID)
	}
}
