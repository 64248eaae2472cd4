package instance

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/pager"
	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/store"
)

// Working-set prefetch (internal/prefetch owns the file; this is when the
// manager records and replays it).
//
// With prefetch "auto", a restore of a cache key that has no recording
// records one (at most one restore per key at a time: the others neither
// record nor replay), and every restore of a key that has one replays it:
//
//   - record, Uffd: the pager logs the session's first faults (up to the size
//     budget); after the time budget the daemon fetches the log and writes
//     <data>/prefetch/<key>.ws.
//   - record, File: the daemon samples the pages the VMM has mapped from its
//     mem-file (pagemap), at growing intervals over the time budget, and
//     writes the same file. Nothing here depends on the VMM reporting faults.
//   - replay, File: the recorded pages, merged into large ranges, are read
//     into the page cache from before the VMM is launched (in the
//     background: the VMM loads and resumes meanwhile).
//   - replay, Uffd: the session is created with the recording; the pager
//     installs it alongside demand faults (internal/pager/prefetch.go).
//
// The recording is a cache: written by the daemon alone, atomically, never
// journalled (a crash loses at most a recording, which the next restore of
// the key makes again), removed once no instance or snapshot has its key.
// A recording of another key or size is never used (prefetch.Load).

// Prefetch settings.
const (
	PrefetchAuto = "auto"
	PrefetchOff  = "off"

	defaultPrefetchWindow   = 5 * time.Second
	defaultPrefetchMaxBytes = 256 << 20
)

// ValidPrefetch checks a prefetch setting.
func ValidPrefetch(mode string) error {
	if mode != PrefetchAuto && mode != PrefetchOff {
		return fmt.Errorf("prefetch %q: want %s or %s", mode, PrefetchAuto, PrefetchOff)
	}
	return nil
}

// File replay's readahead: recorded pages up to 16 pages (64 KiB) apart are
// read as one range of at most 8 MiB.
const (
	fileReadAheadGap = 16
	fileReadAheadMax = 2048
)

// prefetchState is the manager's prefetch bookkeeping.
type prefetchState struct {
	mu        sync.Mutex
	recording map[string]bool               // cache keys a restore is recording; guarded by mu
	reading   map[string]chan struct{}      // cache key → closed when a File replay's reads of it end; guarded by mu
	stats     map[string]*api.Prefetch      // instance id → its last restore's prefetch; guarded by mu
	cancel    map[string]context.CancelFunc // instance id → its running record/replay follow-up; guarded by mu
	gc        chan struct{}                 // kicks the recordings' garbage collector
}

// prefetchRun is one restore's prefetch.
type prefetchRun struct {
	m        *Manager
	id       string // instance
	key      string
	mem      *os.File // the mem-file, open for the run: its name moves (latest → base), its inode does not
	backend  string
	wsPath   string
	mode     string // "record", "replay" or "none"
	start    time.Time
	rec      prefetch.Recording // replay: the recording
	fileRuns []prefetch.Run     // replay, File: the readahead ranges
	absent   []uint64           // replay, File: pages of fileRuns not cached before the readahead
	// replay, File: the reads that bring fileRuns in (populate), started
	// before the VMM; popDone is closed when they end, at popAt, with popErr.
	popCancel context.CancelFunc
	popDone   chan struct{}
	popAt     time.Time
	popErr    error
	session   time.Time // Uffd: when the pager session was created
	claimed   bool      // holds the key's recording claim
}

// beginPrefetch decides what a restore of memPath (cache key key) does:
// replay the key's recording, record one, or nothing. It returns nil with
// prefetch off.
func (m *Manager) beginPrefetch(id, key, memPath, backend string, start time.Time) *prefetchRun {
	if m.cfg.Prefetch == PrefetchOff || key == "" {
		return nil
	}
	r := &prefetchRun{m: m, id: id, key: key, backend: backend, start: start, mode: "none"}
	set := func(p api.Prefetch) {
		m.setPrefetchStats(id, p)
		if p.Mode == "none" {
			m.met.prefetchRestores.WithLabelValues(backend, "none").Inc()
		}
	}
	path, err := m.layout.WorkingSet(key)
	if err == nil {
		r.mem, err = os.Open(memPath)
	}
	var st os.FileInfo
	if err == nil {
		st, err = r.mem.Stat()
	}
	if err != nil {
		if r.mem != nil {
			r.mem.Close()
		}
		set(api.Prefetch{Mode: "none", Done: true, Error: err.Error()})
		return nil
	}
	r.wsPath = path
	rec, err := prefetch.Load(path, key, st.Size())
	switch {
	case err == nil:
		r.mode, r.rec = "replay", rec
		set(api.Prefetch{Mode: r.mode, PagesRecorded: uint64(len(rec.Pages))})
		return r
	case errors.Is(err, prefetch.ErrStale), errors.Is(err, prefetch.ErrCorrupt):
		// Never used: recorded again below.
		m.log.Warn("prefetch: unusable recording removed", "instance", id, "snapshot", key, "err", err)
		os.Remove(path)
	case !errors.Is(err, os.ErrNotExist):
		m.log.Warn("prefetch: recording unreadable; not prefetching", "instance", id, "snapshot", key, "err", err)
		r.mem.Close()
		set(api.Prefetch{Mode: "none", Done: true, Error: err.Error()})
		return nil
	}
	m.pfs.mu.Lock()
	if !m.pfs.recording[key] {
		m.pfs.recording[key] = true
		r.mode, r.claimed = "record", true
	}
	m.pfs.mu.Unlock()
	if !r.claimed {
		r.mem.Close()
		set(api.Prefetch{Mode: "none", Done: true, Error: "another restore of this cache key is recording its working set"})
		return nil
	}
	set(api.Prefetch{Mode: r.mode})
	return r
}

// sessionRequest fills a Uffd restore's session request: record the first
// faults, or replay the recording.
func (r *prefetchRun) sessionRequest(req *pager.SessionRequest) {
	if r == nil {
		return
	}
	switch r.mode {
	case "record":
		req.RecordPages = int(r.m.cfg.PrefetchMaxBytes / int64(os.Getpagesize()))
	case "replay":
		req.PrefetchPath = r.wsPath
	}
	r.session = time.Now()
}

// readAhead starts reading a File restore's recorded working set into the
// page cache, before the VMM is launched, in the background: the restore
// does not wait for the disk, and the guest finds the pages there or on
// their way. It notes which pages the page cache lacked.
func (r *prefetchRun) readAhead() {
	if r == nil || r.mode != "replay" || r.backend != api.BackendFile {
		return
	}
	r.fileRuns = prefetch.Plan(r.rec.Pages, fileReadAheadGap, fileReadAheadMax)
	res, err := prefetch.OpenResidency(r.mem)
	if err == nil {
		r.absent, err = res.Absent(r.fileRuns)
		res.Close()
	}
	if err != nil {
		r.m.log.Warn("prefetch: readahead", "instance", r.id, "err", err)
		r.fail(err)
		return
	}
	r.m.updatePrefetchStats(r.id, func(p *api.Prefetch) { p.PagesPrefetched = uint64(len(r.absent)) })
	ctx, cancel := context.WithCancel(r.m.ctx)
	r.popCancel, r.popDone = cancel, make(chan struct{})
	r.m.wg.Add(1)
	go func() {
		defer r.m.wg.Done()
		defer close(r.popDone)
		r.popErr = r.populate(ctx)
		r.popAt = time.Now()
	}()
}

// populate reads the working set into the page cache. Restores of one key
// at once (a burst of forks) read it once: the others wait for the first,
// then find every range cached.
func (r *prefetchRun) populate(ctx context.Context) error {
	m := r.m
	m.pfs.mu.Lock()
	for {
		wait, busy := m.pfs.reading[r.key]
		if !busy {
			break
		}
		m.pfs.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done():
			return ctx.Err()
		}
		m.pfs.mu.Lock()
	}
	done := make(chan struct{})
	m.pfs.reading[r.key] = done
	m.pfs.mu.Unlock()
	defer func() {
		m.pfs.mu.Lock()
		delete(m.pfs.reading, r.key)
		m.pfs.mu.Unlock()
		close(done)
	}()
	_, err := prefetch.Populate(ctx, r.mem, r.fileRuns)
	return err
}

// abort gives up a restore's prefetch (the restore failed).
func (r *prefetchRun) abort() {
	if r == nil {
		return
	}
	r.release()
	r.m.forgetPrefetch(r.id)
}

// release gives up the key's recording claim and the mem-file (after the
// reads that use it).
func (r *prefetchRun) release() {
	if r.popDone != nil {
		r.popCancel()
		<-r.popDone
	}
	if r.mem != nil {
		r.mem.Close()
		r.mem = nil
	}
	if r.claimed {
		// A hold point for tests (their faultHook can keep the claim
		// taken); it injects no error.
		_ = r.m.fault("prefetch:release-claim")
		r.m.pfs.mu.Lock()
		delete(r.m.pfs.recording, r.key)
		r.m.pfs.mu.Unlock()
		r.claimed = false
	}
}

func (r *prefetchRun) fail(err error) {
	r.m.updatePrefetchStats(r.id, func(p *api.Prefetch) { p.Done, p.Error = true, err.Error() })
}

// follow runs after a successful restore, in the background: it records
// the working set over the time budget, or follows the replay and measures
// it. Stopping, deleting or standing the instance by cancels it.
func (r *prefetchRun) follow(in store.Instance, pg Pager) {
	if r == nil {
		return
	}
	m := r.m
	ctx, cancel := context.WithCancel(m.ctx)
	m.pfs.mu.Lock()
	if old := m.pfs.cancel[r.id]; old != nil {
		old()
	}
	m.pfs.cancel[r.id] = cancel
	m.pfs.mu.Unlock()
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer cancel()
		defer r.release()
		var err error
		switch {
		case r.mode == "record" && r.backend == api.BackendUffd:
			err = r.recordUffd(ctx, in, pg)
		case r.mode == "record":
			err = r.recordFile(ctx, in)
		case r.backend == api.BackendUffd:
			err = r.followUffd(ctx, in, pg)
		default:
			err = r.followFile(ctx, in)
		}
		if err != nil && ctx.Err() == nil {
			m.log.Warn("prefetch: "+r.mode, "instance", r.id, "snapshot", r.key, "backend", r.backend, "err", err)
			r.fail(err)
		} else if err != nil {
			r.fail(fmt.Errorf("stopped before the prefetch window ended: %w", context.Cause(ctx)))
		}
		m.met.observePrefetch(r.backend, m.prefetchStats(r.id))
	}()
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func (r *prefetchRun) windowLeft() time.Duration {
	return time.Until(r.start.Add(r.m.cfg.PrefetchWindow))
}

// recordUffd fetches the pager's first-fault log once the window has
// passed, or once the log is full (the size budget), whichever is first.
func (r *prefetchRun) recordUffd(ctx context.Context, in store.Instance, pg Pager) error {
	budget := uint64(r.m.cfg.PrefetchMaxBytes / int64(os.Getpagesize()))
	for left := r.windowLeft(); left > 0; left = r.windowLeft() {
		if err := sleep(ctx, min(left, 100*time.Millisecond)); err != nil {
			return err
		}
		if sp, err := pg.SessionPrefetch(ctx, in.PagerSession); err == nil && sp != nil && sp.PagesRecorded >= budget {
			break
		}
	}
	rec, err := pg.Recording(ctx, in.PagerSession)
	if err != nil {
		return err
	}
	return r.store(rec)
}

// recordFile samples the pages the VMM maps from its mem-file over the
// window.
func (r *prefetchRun) recordFile(ctx context.Context, in store.Instance) error {
	rec, err := prefetch.RecordMapped(ctx, in.Pid, r.mem, r.key, prefetch.RecordOptions{
		Window: max(r.windowLeft(), 0), MaxPages: int(r.m.cfg.PrefetchMaxBytes / int64(os.Getpagesize())),
	})
	if err != nil {
		return err
	}
	return r.store(rec)
}

// store writes a recording under its key.
func (r *prefetchRun) store(rec prefetch.Recording) error {
	if err := os.MkdirAll(r.m.layout.PrefetchDir(), 0o700); err != nil {
		return err
	}
	if err := prefetch.Write(r.wsPath, rec); err != nil {
		return err
	}
	r.m.updatePrefetchStats(r.id, func(p *api.Prefetch) { p.PagesRecorded, p.Done = uint64(len(rec.Pages)), true })
	r.m.log.Info("prefetch: working set recorded", "instance", r.id, "snapshot", r.key, "backend", r.backend,
		"pages", len(rec.Pages), "window", rec.Window)
	return nil
}

// workingSetWait bounds how long a replay is followed to see it finish
// bringing the working set in, when that takes longer than the window.
const workingSetWait = time.Minute

// followUffd reads the pager's replay progress until it has installed the
// working set and the window has closed, then its waste estimate.
func (r *prefetchRun) followUffd(ctx context.Context, in store.Instance, pg Pager) error {
	poll := 10 * time.Millisecond
	giveUp := time.Now().Add(workingSetWait)
	for {
		sp, err := pg.SessionPrefetch(ctx, in.PagerSession)
		if err != nil {
			return err
		}
		if sp == nil || sp.Mode != "replay" {
			msg := "the pager did not replay the recording"
			if sp != nil && sp.Error != "" {
				msg += ": " + sp.Error
			}
			return errors.New(msg)
		}
		left := r.windowLeft()
		final := left <= 0 && (sp.Done || time.Now().After(giveUp))
		r.m.updatePrefetchStats(r.id, func(p *api.Prefetch) {
			p.PagesPrefetched, p.PagesWasted = sp.PagesPrefetched, sp.PagesWasted
			if sp.Done && sp.WorkingSetMs > 0 {
				p.WorkingSetMs = r.session.Sub(r.start).Milliseconds() + sp.WorkingSetMs
			}
			p.Done = final
		})
		if final {
			return nil
		}
		wait := poll
		if sp.Done {
			wait = left
		} else if left > 0 {
			wait = min(poll, left)
		}
		if err := sleep(ctx, wait); err != nil {
			return err
		}
		poll = min(poll*2, 200*time.Millisecond)
	}
}

// followFile waits until the reads of the working set are done (the time
// to working set), then, at the end of the window, counts the pages they
// brought in that the VMM never mapped (the waste).
func (r *prefetchRun) followFile(ctx context.Context, in store.Instance) error {
	if r.popDone == nil {
		return errors.New("the working set was not read ahead")
	}
	select {
	case <-r.popDone:
	case <-ctx.Done():
		return ctx.Err()
	}
	if r.popErr != nil {
		return fmt.Errorf("read the working set: %w", r.popErr)
	}
	ms := max(r.popAt.Sub(r.start).Milliseconds(), 1)
	r.m.updatePrefetchStats(r.id, func(p *api.Prefetch) { p.WorkingSetMs = ms })
	if err := sleep(ctx, max(r.windowLeft(), 0)); err != nil {
		return err
	}
	s, err := prefetch.NewSampler(in.Pid, r.mem)
	if err != nil {
		return err
	}
	defer s.Close()
	used := make(map[uint64]bool, len(r.absent))
	for _, p := range r.absent {
		used[p] = false
	}
	if err := s.Sample(func(p uint64) {
		if _, ok := used[p]; ok {
			used[p] = true
		}
	}); err != nil {
		return err
	}
	wasted := uint64(0)
	for _, u := range used {
		if !u {
			wasted++
		}
	}
	r.m.updatePrefetchStats(r.id, func(p *api.Prefetch) { p.PagesWasted, p.Done = wasted, true })
	return nil
}

func (m *Manager) setPrefetchStats(id string, p api.Prefetch) {
	m.pfs.mu.Lock()
	defer m.pfs.mu.Unlock()
	m.pfs.stats[id] = &p
}

func (m *Manager) updatePrefetchStats(id string, f func(*api.Prefetch)) {
	m.pfs.mu.Lock()
	defer m.pfs.mu.Unlock()
	if p := m.pfs.stats[id]; p != nil {
		f(p)
	}
}

// prefetchStats is a copy of an instance's last restore's prefetch (nil:
// none since the daemon started).
func (m *Manager) prefetchStats(id string) *api.Prefetch {
	m.pfs.mu.Lock()
	defer m.pfs.mu.Unlock()
	p := m.pfs.stats[id]
	if p == nil {
		return nil
	}
	c := *p
	return &c
}

// stopPrefetch cancels an instance's running record or replay follow-up
// (its VMM is going away); its last figures stay.
func (m *Manager) stopPrefetch(id string) {
	m.pfs.mu.Lock()
	defer m.pfs.mu.Unlock()
	if c := m.pfs.cancel[id]; c != nil {
		c()
		delete(m.pfs.cancel, id)
	}
}

// forgetPrefetch stops and drops an instance's prefetch.
func (m *Manager) forgetPrefetch(id string) {
	m.stopPrefetch(id)
	m.pfs.mu.Lock()
	delete(m.pfs.stats, id)
	m.pfs.mu.Unlock()
	m.kickPrefetchGC()
}

// kickPrefetchGC asks the collector to remove recordings nothing uses.
func (m *Manager) kickPrefetchGC() {
	select {
	case m.pfs.gc <- struct{}{}:
	default:
	}
}

// runPrefetchGC removes recordings of keys no instance or snapshot has, on
// each kick, until the manager closes.
func (m *Manager) runPrefetchGC() {
	defer m.wg.Done()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-m.pfs.gc:
			if err := m.gcRecordings(m.ctx); err != nil && m.ctx.Err() == nil {
				m.log.Warn("prefetch: garbage collection", "err", err)
			}
		}
	}
}

// gcRecordings removes <data>/prefetch/<key>.ws for every key no instance
// or snapshot holds and no restore is recording, and leftover temp files.
func (m *Manager) gcRecordings(ctx context.Context) error {
	ents, err := os.ReadDir(m.layout.PrefetchDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if len(ents) == 0 {
		return nil // nothing to collect: no need to list every record
	}
	live, err := m.db.CacheKeysInUse(ctx)
	if err != nil {
		return err
	}
	recording := map[string]bool{}
	m.pfs.mu.Lock()
	for k := range m.pfs.recording {
		live[k], recording[k] = true, true
	}
	m.pfs.mu.Unlock()
	for _, e := range ents {
		// Only recordings and their temp files are ours: anything else in
		// the directory is left alone.
		name, tmp := strings.CutSuffix(e.Name(), atomicfile.TempSuffix)
		key, ok := guestdir.WorkingSetKey(name)
		if !ok || !e.Type().IsRegular() {
			continue
		}
		if tmp && recording[key] || !tmp && live[key] {
			continue
		}
		path, err := m.layout.WorkingSet(key)
		if err != nil {
			continue
		}
		if tmp {
			path += atomicfile.TempSuffix
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		m.log.Info("prefetch: removed a recording nothing uses", "snapshot", key, "temp", tmp)
	}
	return nil
}
