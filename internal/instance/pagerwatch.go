package instance

import (
	"context"
	"errors"
	"time"

	"github.com/forkd/forkd/internal/pager"
	"github.com/forkd/forkd/internal/pidwatch"
)

// pagerExit returns a channel that is closed when the pager process of
// version v exits, watched through a pidfd (one watch per version, shared
// by every supervisor of a VM it serves). It is nil for v == "" and when no
// pager of v answers its health probe now: the supervisor's session check
// decides then (a refused connection is a dead pager; a stalled one is not
// condemned).
func (m *Manager) pagerExit(ctx context.Context, v string) <-chan struct{} {
	if v == "" {
		return nil
	}
	m.mu.Lock()
	w := m.pagerWatches[v]
	m.mu.Unlock()
	if w != nil && !w.Exited() {
		return w.Done()
	}
	c := m.pagerClient(v)
	pid, err := c.pid(ctx)
	if err != nil {
		return nil
	}
	nw, err := pidwatch.New(pid)
	if err != nil {
		return nil
	}
	// The pidfd pins pid now; ask again that it is still this version's
	// pager (a pid reused in between would be watched for nothing).
	if again, err := c.pid(ctx); err != nil || again != pid {
		nw.Release()
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if cur := m.pagerWatches[v]; cur != nil && !cur.Exited() {
		nw.Release()
		return cur.Done()
	} else if cur != nil {
		cur.Release()
	}
	m.pagerWatches[v] = nw
	return nw.Done()
}

// releasePagerWatches ends every pager watch (Close).
func (m *Manager) releasePagerWatches() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for v, w := range m.pagerWatches {
		w.Release()
		delete(m.pagerWatches, v)
	}
}

// sessionGone asks the pager of version v whether it still serves session:
// one GET /sessions/{id}. A Uffd VM whose session is gone is frozen at its
// next fault of a page not yet served.
func (m *Manager) sessionGone(ctx context.Context, v, session string) bool {
	err := m.pagerClient(v).session(ctx, session)
	var ae *pager.APIError
	switch {
	case err == nil:
		return false
	case pager.IsNotFound(err):
		// The pager answers but does not serve this session: it was
		// restarted since the restore (by another Uffd restore) and the one
		// that served the session died with it (found by reliability
		// TestPagerRestartDoesNotHideADeadSession), or the session ended.
		return true
	case errors.As(err, &ae):
		// It answered something else (an error, or a pager too old to know
		// the route): cannot tell, and a VM is never condemned on that.
		return false
	case ctx.Err() != nil, errors.Is(err, context.DeadlineExceeded):
		// The manager is closing, or the pager is slow (a loaded host, a
		// stopped process): neither says the pager is dead, and a VM is
		// never condemned on a guess.
		return false
	default:
		// No answer at all (no socket, connection refused): the pager is dead.
		return true
	}
}

// pagerProbe is the control client of one version's pager, for the
// supervisors' liveness questions (short timeouts; it never starts a pager).
type pagerProbe struct{ c *pager.Client }

func (m *Manager) pagerClient(v string) pagerProbe {
	dir, err := m.layout.PagerDir(v)
	if err != nil {
		dir = m.layout.PagerRoot() // an unusable version: calls fail cleanly
	}
	return pagerProbe{c: pager.NewClient(pager.ControlSocket(dir))}
}

// pid is the pager's process id, from GET /health (1 s).
func (p pagerProbe) pid(ctx context.Context) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	h, err := p.c.Health(ctx)
	if err != nil {
		return 0, err
	}
	if h.Pid <= 0 {
		return 0, errors.New("pager health has no pid")
	}
	return h.Pid, nil
}

// session is GET /sessions/{id} (1 s): a stalled pager is a timeout, not a
// death.
func (p pagerProbe) session(ctx context.Context, id string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	_, err := p.c.Session(ctx, id)
	return err
}
