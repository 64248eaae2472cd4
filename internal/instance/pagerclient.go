package instance

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/pager"
	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/version"
)

// startPager finds or starts the host pager of this forkd's version in
// <data>/pager/<version> (detached: it outlives the daemon, as the VMs it
// serves do); pagers of other versions are asked to drain.
func (m *Manager) startPager(ctx context.Context) (Pager, error) {
	bin := m.cfg.PagerBinary
	if bin == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, err
		}
		bin = exe
	}
	dir, err := m.layout.PagerDir(version.Version)
	if err != nil {
		return nil, err
	}
	c, err := pager.EnsureRunning(ctx, pager.StartOptions{
		Binary: bin, Dir: dir, Version: version.Version, CacheBytes: m.cfg.PagerCacheBytes,
	}, m.log)
	if err != nil {
		return nil, fmt.Errorf("%w: %v (uffd restores need the pager; file restores work without it)", api.ErrUnavailable, err)
	}
	return hostPager{c: c, version: version.Version}, nil
}

// hostPager adapts *pager.Client to Pager.
type hostPager struct {
	c       *pager.Client
	version string
}

func (h hostPager) CreateSession(ctx context.Context, req pager.SessionRequest) (string, error) {
	s, err := h.c.CreateSession(ctx, req)
	return s.SocketPath, err
}

func (h hostPager) Recording(ctx context.Context, id string) (prefetch.Recording, error) {
	return h.c.Recording(ctx, id)
}

func (h hostPager) SessionPrefetch(ctx context.Context, id string) (*pager.SessionPrefetch, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	info, err := h.c.Session(ctx, id)
	return info.Prefetch, err
}

func (h hostPager) DeleteSession(ctx context.Context, id string) error {
	return h.c.DeleteSession(ctx, id)
}

func (h hostPager) StatsRaw(ctx context.Context) (json.RawMessage, error) { return h.c.StatsRaw(ctx) }

// Session is bounded like Healthy: the check it serves stands in for the
// health probe, so a pager that does not answer within a second is as dead
// as one that does not answer /health.
func (h hostPager) Session(ctx context.Context, id string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	_, err := h.c.Session(ctx, id)
	return err
}

// waitServingTimeout bounds WaitServing: the pager's own handshake timeout
// (10 s) plus a margin for a loaded host.
const waitServingTimeout = 15 * time.Second

// WaitServing waits until the pager has taken the session's handshake and
// serves it. A session the pager ended (a refused handshake: regions past
// the end of the mem-file, a malformed message) is an error saying why.
func (h hostPager) WaitServing(ctx context.Context, id string) error {
	ctx, cancel := context.WithTimeout(ctx, waitServingTimeout)
	defer cancel()
	for delay := time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		info, err := h.c.Session(ctx, id)
		switch {
		case err != nil && ctx.Err() != nil:
			return fmt.Errorf("the pager did not take the VMM's handshake within %v", waitServingTimeout)
		case err != nil:
			return err
		case info.State != "waiting" && info.State != "handshake":
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the pager did not take the VMM's handshake within %v (session state %s)", waitServingTimeout, info.State)
		case <-time.After(delay):
		}
	}
}

func (h hostPager) Version() string { return h.version }

func (h hostPager) Healthy(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	hl, err := h.c.Health(ctx)
	return err == nil && hl.Version == h.version
}

// Drain asks the pager to exit once its last session closes (tests use it
// to leave no pager behind).
func (h hostPager) Drain(ctx context.Context) error { return h.c.Drain(ctx) }

// pagerStatsForMetrics fetches the pager's stats for the re-exported
// forkd_pager_* series. A scrape never starts a pager: it asks the one this
// manager uses, else whatever pager of this version answers in the pager dir
// (one may outlive a daemon restart).
func (m *Manager) pagerStatsForMetrics(ctx context.Context) (pager.Stats, error) {
	if hp, ok := m.startedPager().(hostPager); ok {
		return hp.c.Stats(ctx)
	}
	dir, err := m.layout.PagerDir(version.Version)
	if err != nil {
		return pager.Stats{}, err
	}
	return pager.NewClient(pager.ControlSocket(dir)).Stats(ctx)
}

// existingPager is a client of the pager of version v in the pager dir,
// whether or not it answers; it never starts one.
func (m *Manager) existingPager(v string) Pager {
	dir, err := m.layout.PagerDir(v)
	if err != nil {
		dir = m.layout.PagerRoot() // an unusable version: calls fail cleanly
	}
	return hostPager{c: pager.NewClient(pager.ControlSocket(dir)), version: v}
}
