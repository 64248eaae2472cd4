package instance

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// probePager is a Pager whose health probe blocks until release is closed,
// counting how many probes run at once.
type probePager struct {
	Pager    // the methods these tests never call
	release  chan struct{}
	inProbe  atomic.Int32
	maxProbe atomic.Int32
}

func (p *probePager) Version() string { return "test" }
func (p *probePager) Healthy(ctx context.Context) bool {
	n := p.inProbe.Add(1)
	for {
		old := p.maxProbe.Load()
		if n <= old || p.maxProbe.CompareAndSwap(old, n) {
			break
		}
	}
	<-p.release
	p.inProbe.Add(-1)
	return true
}

// The pager's mutex is never held across its health probe: two restores
// asking for the pager probe it at the same time instead of one after the
// other (a stalled pager made every Uffd restore queue for a second each).
func TestPagerHealthProbesRunWithoutTheLock(t *testing.T) {
	m := &Manager{}
	p := &probePager{release: make(chan struct{})}
	m.pagerOnce.p = p
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if got, err := m.pager(context.Background()); err != nil || got != p {
				t.Errorf("pager() = %v, %v; want the healthy pager", got, err)
			}
		}()
	}
	waitUntil(t, "two health probes at once", func() bool { return p.maxProbe.Load() == 2 })
	close(p.release)
	wg.Wait()
}

// A start of the pager (up to 10 s) holds no lock either: meanwhile the
// manager can still ask which pager it uses, and callers that arrive during
// the start share it rather than starting their own.
func TestPagerStartHoldsNoLockAndIsShared(t *testing.T) {
	m := &Manager{}
	release := make(chan struct{})
	var starts atomic.Int32
	p := &probePager{release: make(chan struct{})}
	close(p.release)
	m.pagerOnce.start = func(ctx context.Context) (Pager, error) {
		starts.Add(1)
		<-release
		return p, nil
	}
	results := make(chan Pager, 3)
	go func() { got, _ := m.pager(context.Background()); results <- got }()
	waitUntil(t, "the start under way", func() bool {
		m.pagerOnce.mu.Lock()
		defer m.pagerOnce.mu.Unlock()
		return m.pagerOnce.starting != nil
	})
	for range 2 {
		go func() { got, _ := m.pager(context.Background()); results <- got }()
	}
	asked := make(chan Pager, 1)
	go func() { asked <- m.startedPager() }()
	select {
	case got := <-asked:
		if got != nil {
			t.Fatalf("startedPager during the start = %v, want none yet", got)
		}
	case <-results:
		t.Fatal("a caller got the pager before the start ended")
	case <-time.After(time.Minute):
		t.Fatal("asking which pager is in use blocked for a minute behind a start")
	}
	close(release)
	for range 3 {
		if got := <-results; got != p {
			t.Fatalf("pager() = %v, want the started pager", got)
		}
	}
	if n := starts.Load(); n != 1 {
		t.Fatalf("%d starts for three concurrent callers, want 1", n)
	}
}
