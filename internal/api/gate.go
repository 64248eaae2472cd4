package api

import (
	"context"
	"fmt"
	"net/http"
	"sort"
	"sync"
	"time"
)

// Gate admits the requests that change something (every method but GET,
// HEAD and OPTIONS) and counts them while they run, so a daemon that is
// stopping can refuse new ones and wait for the ones in flight: Close shuts
// the gate (a mutating request arriving afterwards gets 503
// shutting_down), Wait blocks until the last one in flight has returned or
// its context ends. Reads are never refused: they change nothing.
type Gate struct {
	mu       sync.Mutex
	closed   bool                // guarded by mu
	inflight map[uint64]inflight // guarded by mu
	seq      uint64              // guarded by mu
	idle     chan struct{}       // closed once closed and inflight is empty; guarded by mu
	closing  chan struct{}       // closed by Close
}

type inflight struct {
	what  string
	since time.Time
}

// NewGate returns an open gate.
func NewGate() *Gate {
	return &Gate{inflight: map[uint64]inflight{}, idle: make(chan struct{}), closing: make(chan struct{})}
}

// Wrap admits next's mutating requests through the gate. Once it is
// closed, every response also carries "Connection: close", so clients
// leave the connections of a stopping daemon.
func (g *Gate) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if g.Closed() {
			w.Header().Set("Connection", "close")
		}
		switch r.Method {
		case http.MethodGet, http.MethodHead, http.MethodOptions:
			next.ServeHTTP(w, r)
			return
		}
		id, ok := g.enter(r.Method + " " + r.URL.Path)
		if !ok {
			writeError(w, errorf(http.StatusServiceUnavailable, CodeShuttingDown,
				"%s %s: the daemon is shutting down and takes no new changes; retry once it is back", r.Method, r.URL.Path))
			return
		}
		defer g.leave(id)
		next.ServeHTTP(w, r)
	})
}

func (g *Gate) enter(what string) (uint64, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return 0, false
	}
	g.seq++
	g.inflight[g.seq] = inflight{what: what, since: time.Now()}
	return g.seq, true
}

func (g *Gate) leave(id uint64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.inflight, id)
	if g.closed && len(g.inflight) == 0 {
		closeOnce(g.idle)
	}
}

// Closing is closed once Close is called: long-lived responses (event
// streams) end then, rather than hold the daemon open.
func (g *Gate) Closing() <-chan struct{} { return g.closing }

// Closed reports whether Close was called.
func (g *Gate) Closed() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.closed
}

// Close shuts the gate: from now on mutating requests are refused.
func (g *Gate) Close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closed = true
	closeOnce(g.closing)
	if len(g.inflight) == 0 {
		closeOnce(g.idle)
	}
}

// Wait blocks until the gate is closed and no admitted request runs any
// more, or ctx ends: then it returns an error naming what still runs.
func (g *Gate) Wait(ctx context.Context) error {
	g.mu.Lock()
	idle := g.idle
	g.mu.Unlock()
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%w: still running: %v", context.Cause(ctx), g.InFlight())
	}
}

// InFlight lists the admitted requests that run now ("POST /instances
// (running 3.2s)"), oldest first.
func (g *Gate) InFlight() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	list := make([]inflight, 0, len(g.inflight))
	for _, f := range g.inflight {
		list = append(list, f)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].since.Before(list[j].since) })
	out := make([]string, len(list))
	for i, f := range list {
		out[i] = fmt.Sprintf("%s (running %s)", f.what, time.Since(f.since).Round(100*time.Millisecond))
	}
	return out
}

func closeOnce(ch chan struct{}) {
	select {
	case <-ch:
	default:
		close(ch)
	}
}
