package instance

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/forkd/forkd/internal/pager"
	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/store"
)

// Pager is what the manager needs of the host's userfaultfd pager
// (internal/pager's Client, adapted in pagerclient.go).
type Pager interface {
	// CreateSession makes a session serving req.BackingPath's pages under
	// req.CacheKey (recording or replaying a working set as req says; its
	// socket in req.SocketDir, if set) and returns the socket the VMM hands its uffd to.
	CreateSession(ctx context.Context, req pager.SessionRequest) (socketPath string, err error)
	// Recording is a recording session's first faults so far.
	Recording(ctx context.Context, sessionID string) (prefetch.Recording, error)
	// SessionPrefetch is one session's recording or replay progress (nil:
	// it does neither).
	SessionPrefetch(ctx context.Context, sessionID string) (*pager.SessionPrefetch, error)
	DeleteSession(ctx context.Context, sessionID string) error
	StatsRaw(ctx context.Context) (json.RawMessage, error)
	// Session asks about one session: nil while the pager serves it, an
	// error for which pager.IsNotFound holds when it does not, a
	// *pager.APIError for another answer, any other error for no answer.
	Session(ctx context.Context, sessionID string) error
	// WaitServing waits until the pager has taken the session's handshake
	// and serves it; an ended session (a refused handshake) is an error
	// saying why.
	WaitServing(ctx context.Context, sessionID string) error
	// Version is the pager's version (sessions are closed through the pager
	// that owns them).
	Version() string
	// Healthy reports whether the pager answers (a short probe).
	Healthy(ctx context.Context) bool
}

// pagerState starts the host pager on first use (the first Uffd restore, or
// a stats request). A pager that cannot start fails only Uffd restores.
//
// Its mutex guards two fields and is never held across I/O: the health
// probe of the pager in use and the start of a new one (up to 10 s) run
// without it, so Uffd restores never queue behind one another's probe, and
// concurrent restores that all find no pager share one start (start).
type pagerState struct {
	mu       sync.Mutex  // guards p and starting
	p        Pager       // the pager in use; nil before the first start and once found dead
	starting *pagerStart // the start under way, nil when none runs
	// start starts (or finds) the pager: startPager, or a test's stand-in.
	start func(ctx context.Context) (Pager, error)
}

// pagerStart is one start of the pager that concurrent callers share.
type pagerStart struct {
	done chan struct{} // closed when p and err are set
	p    Pager
	err  error
}

func (m *Manager) pager(ctx context.Context) (Pager, error) {
	st := &m.pagerOnce
	for {
		st.mu.Lock()
		p := st.p
		if p != nil {
			st.mu.Unlock()
			// A pager that died (killed, crashed) is started again rather
			// than failing every later Uffd restore until the daemon restarts.
			if p.Healthy(ctx) {
				return p, nil
			}
			st.mu.Lock()
			if st.p == p {
				m.log.Warn("pager does not answer: starting it again")
				st.p = nil
			}
			st.mu.Unlock()
			continue
		}
		if s := st.starting; s != nil {
			st.mu.Unlock()
			select {
			case <-s.done:
				if s.err != nil {
					return nil, s.err
				}
				return s.p, nil
			case <-ctx.Done():
				return nil, fmt.Errorf("pager: waiting for its start: %w", ctx.Err())
			}
		}
		s := &pagerStart{done: make(chan struct{})}
		st.starting = s
		start := st.start
		st.mu.Unlock()
		if start == nil {
			start = m.startPager
		}
		s.p, s.err = start(ctx)
		if s.err != nil {
			s.err = fmt.Errorf("pager: %w", s.err)
		}
		st.mu.Lock()
		st.starting = nil
		if s.err == nil {
			st.p = s.p
		}
		st.mu.Unlock()
		close(s.done)
		return s.p, s.err
	}
}

// startedPager returns the pager if it has been started, without starting it.
func (m *Manager) startedPager() Pager {
	m.pagerOnce.mu.Lock()
	defer m.pagerOnce.mu.Unlock()
	return m.pagerOnce.p
}

// closeSession releases the pager session serving an instance's memory, if
// any, and clears it from the record (the caller saves the record).
func (m *Manager) closeSession(ctx context.Context, in *store.Instance) {
	if in.PagerSession == "" {
		return
	}
	// Never start a pager just to close a session: ask the one in use, else
	// the one of the session's version if it still answers.
	p := m.startedPager()
	if p == nil || p.Version() != in.PagerVersion {
		p = m.existingPager(in.PagerVersion)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err := p.DeleteSession(ctx, in.PagerSession)
	if err != nil {
		m.log.Warn("close pager session", "instance", in.ID, "session", in.PagerSession, "err", err)
	}
	in.PagerSession, in.PagerVersion = "", ""
}

// PagerStats returns the pager's /stats JSON.
func (m *Manager) PagerStats(ctx context.Context) (json.RawMessage, error) {
	p, err := m.pager(ctx)
	if err != nil {
		return nil, err
	}
	return p.StatsRaw(ctx)
}

// withSessionEnd adds to a failed uffd restore's error why the pager ended
// its session, if it did: the cause (a refused handshake, say) is otherwise
// only in the pager's log.
func (m *Manager) withSessionEnd(ctx context.Context, pg Pager, session string, err error) error {
	if pg == nil || session == "" {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if serr := pg.Session(ctx, session); serr != nil && pager.IsNotFound(serr) {
		return fmt.Errorf("%w (pager: %v)", err, serr)
	}
	return err
}
