package pager

import (
	"bytes"
	"fmt"
	"os"
	"sync"

	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/uffd"
)

// replayPlan is what every replay of one recording shares: the recording,
// decoded and checked once, and the runs planned from it. Every fork of a
// key replays the same recording, and each session decoded it (a sort, to
// validate it) and planned it twice (for the readahead and for replay, a
// sort each): in a 25-fork burst of 4 KiB pages, several ms of the pager's
// CPU per fork (BENCHMARKS.md, Pager).
//
// A plan is the plan of exactly the bytes it was made from: a session
// reuses its key's plan only when its recording file holds those bytes, so
// a new recording of the key (another file, or the same path rewritten) is
// decoded and planned afresh, never replayed from a stale plan. Everything
// in it is immutable once made, except runs, filled in by page size.
type replayPlan struct {
	raw       []byte             // the recording file's bytes: the plan's identity
	size      int64              // the mem-file size rec was checked against
	rec       prefetch.Recording // decoded, in 4 KiB pages (in4K)
	readAhead []prefetch.Run     // rec planned for reads into the page cache

	mu   sync.Mutex
	runs map[uint64][]prefetch.Run // rec planned for replay, by region page size; guarded by mu
}

// planFor returns the plan of the recording at path for a session of
// cache key key (interned as id) and a mem-file of size bytes: the key's
// current plan when the file holds the bytes it was made from, else a new
// one, which becomes the key's (sessions holding the old one keep it).
func (s *Server) planFor(path, key string, id uint32, size int64) (*replayPlan, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load recording: %w", err)
	}
	s.mu.Lock()
	p := s.plans[id]
	s.mu.Unlock()
	if p != nil && p.size == size && (bytes.Equal(p.raw, raw) || s.cfg.plansByKeyOnly) {
		return p, nil
	}
	rec, err := prefetch.Parse(path, raw, key, size)
	if err != nil {
		return nil, err
	}
	rec = in4K(rec)
	p = &replayPlan{raw: raw, size: size, rec: rec, runs: make(map[uint64][]prefetch.Run),
		readAhead: prefetch.Plan(rec.Pages, readAheadGap, readAheadMax)}
	s.mu.Lock()
	s.plans[id] = p
	s.mu.Unlock()
	return p, nil
}

// replayRuns is the recording planned in units of ps bytes (a region's
// page size): the recorded 4 KiB pages of one 2 MiB page are one page to
// install, and runs of 4 KiB pages would each cover it whole (a 2 MiB page
// recorded in four 512 KiB runs was read four times, and replay fell
// behind the guest's faults). Runs hold at most runBytes (one page at
// least) and come in first-touch order. The result is shared: read only.
func (p *replayPlan) replayRuns(ps uint64) []prefetch.Run {
	p.mu.Lock()
	defer p.mu.Unlock()
	if runs, ok := p.runs[ps]; ok {
		return runs
	}
	units := p.rec.Pages
	if ps != uffd.PageSize {
		units = make([]uint64, len(p.rec.Pages))
		for i, pg := range p.rec.Pages {
			units[i] = pg * uffd.PageSize / ps
		}
	}
	runs := prefetch.Plan(units, 0, max(1, runBytes/ps))
	p.runs[ps] = runs
	return runs
}

// dropPlanLocked forgets key id's plan once no session of the key is left
// (s.mu held): the next session of it reads and plans its recording again.
func (s *Server) dropPlanLocked(id uint32) {
	for _, o := range s.sessions {
		if o != nil && o.keyID == id {
			return
		}
	}
	delete(s.plans, id)
}
