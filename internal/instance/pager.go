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
	// req.CacheKey (recording or replaying a working set as req says) and
	// returns the socket the VMM hands its uffd to.
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
type pagerState struct {
	mu sync.Mutex // guards p
	p  Pager
}

func (m *Manager) pager(ctx context.Context) (Pager, error) {
	m.pagerOnce.mu.Lock()
	defer m.pagerOnce.mu.Unlock()
	if m.pagerOnce.p != nil {
		// A pager that died (killed, crashed) is started again rather than
		// failing every later Uffd restore until the daemon restarts.
		if m.pagerOnce.p.Healthy(ctx) {
			return m.pagerOnce.p, nil
		}
		m.log.Warn("pager does not answer: starting it again")
		m.pagerOnce.p = nil
	}
	p, err := m.startPager(ctx)
	if err != nil {
		return nil, fmt.Errorf("pager: %w", err)
	}
	m.pagerOnce.p = p
	return p, nil
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
