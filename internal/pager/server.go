package pager

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/forkd/forkd/internal/datadir"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/hostpath"
	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/uffd"
)

// Names inside the pager's directory (docs/architecture.md §4:
// <data>/pager/<version>/{control.sock,pager.pid,sessions/}).
const (
	controlSockName = "control.sock"
	pidFileName     = "pager.pid"
	sessionsDirName = "sessions"
)

// ControlSocket is the control API socket of the pager in dir.
func ControlSocket(dir string) string { return filepath.Join(dir, controlSockName) }

// PidFile is the pid file of the pager in dir.
func PidFile(dir string) string { return filepath.Join(dir, pidFileName) }

func sessionSocket(dir, id string) string {
	return filepath.Join(dir, sessionsDirName, id+".sock")
}

// Config configures a pager.
type Config struct {
	// Dir is the pager's directory, <data>/pager/<version>.
	Dir string
	// CacheBytes is the page cache budget (0 disables caching).
	CacheBytes int64
	// Version is reported by /health; the daemon compares it with its own.
	Version string
	// AcceptTimeout bounds the wait for the VMM to connect to a new
	// session (it may crash before connecting). Default 30 s.
	AcceptTimeout time.Duration
	// HandshakeTimeout bounds the wait for the handshake message once the
	// VMM is connected. Default 10 s.
	HandshakeTimeout time.Duration
	// Root is the only tree a session's files (backing_path, prefetch_path)
	// may be in, with no symlink below it: forkd's data dir, two levels
	// above Dir (<data>/pager/<version>) unless set. The control socket is
	// root's alone, but still: the pager serves forkd's mem-files, not any
	// file a caller names.
	Root string

	// ignoreRemoves is a test hook, the twin of the REMOVE rule: it makes
	// the pager forget discarded ranges, so tests can show they would then
	// read stale file data.
	ignoreRemoves bool
	// prefetchIgnoresRemoves is the twin of the prefetch side of that
	// rule: replay installs pages in removed ranges.
	prefetchIgnoresRemoves bool
	// plansByKeyOnly is the twin of the rule that a replay plan is reused
	// only for the bytes it was made from (plan.go): a session then replays
	// its key's current plan whatever its recording file holds.
	plansByKeyOnly bool
	// holdPrefetch, a test hook, keeps replay from installing anything
	// until it is closed (so a test can discard pages first).
	holdPrefetch <-chan struct{}
	// afterInstall, a test hook, is called by the session goroutine right
	// after a fault's page is installed (so the guest already has it),
	// with the page's file offset: a test can hold the pager there.
	afterInstall func(off uint64)
	// beforeRead, a test hook, is called before a fault's page at file
	// offset off is read from the mem-file (by a cold reader, or in place):
	// a test can hold the read there. It must return when ctx ends.
	beforeRead func(ctx context.Context, off uint64)
	// syncColdReads serves every fault's read in place, on the session
	// goroutine, as before cold reads: the twin of the cold-read tests.
	syncColdReads bool
	// parkEveryMiss sends every miss to a cold reader, as on a filesystem
	// without RWF_NOWAIT: a test that holds a cold read needs its fault
	// parked, and a page dropped from the page cache can be back by the
	// time the session's non-blocking read looks (that read starts the
	// readahead, and a fast disk can finish it within the call: ~1 in 100
	// on this host's).
	parkEveryMiss bool
	// noPopulateRead answers every MADV_POPULATE_READ with EINVAL, as a
	// kernel before 5.14 does (populateRead): the pages of a mapped read
	// then fault in as they are read.
	noPopulateRead bool
	// unpopulatedWindows skips populateRead altogether, as if the page
	// cache had dropped a window's pages between it and the copy: the
	// copy from the mapping then fails with ENOMEM (install reads the page
	// again).
	unpopulatedWindows bool
	// noMappedRetry ends the session on that ENOMEM, as before install read
	// the page again: its twin.
	noMappedRetry bool
	// noMappedFaults serves a lone session's 2 MiB misses as any miss, read
	// into the heap and cached, not from a mapping of the mem-file
	// (mapped.go): the twin of the mapped-fault tests, and the benchmarks'
	// baseline.
	noMappedFaults bool
	// privateMemMaps gives every session a mapping of its mem-file of its
	// own, as before they were shared (memmap.go): the twin of the sharing
	// test, and the benchmarks' baseline.
	privateMemMaps bool
	// unmapSharedEarly is the twin of the rule that a shared mapping is
	// unmapped only when no session holds it (memmap.go): any session's
	// end unmaps it, under its siblings' readers.
	unmapSharedEarly bool
}

// Server is a running pager: the control API, the sessions and the page
// cache they share.
type Server struct {
	cfg   Config
	log   *slog.Logger
	cache *pageCache
	stats counters

	dirLock *os.File // flock'ed pager dir: one pager per dir
	ln      *net.UnixListener
	http    *http.Server

	sessionsTotal atomic.Uint64
	sessionWG     sync.WaitGroup

	zeroOnce sync.Once
	zeroHuge []byte // 2 MiB of zeros, for hugetlbfs regions (no ZEROPAGE there)

	runBufs sync.Pool // replay's run buffers (*[]byte of runBytes), prefetch.go
	memMaps *memMaps  // the mem-files' shared mappings, memmap.go

	mu       sync.Mutex
	sessions map[string]*session // guarded by mu
	// ended remembers why the last maxEnded sessions ended (id → cause),
	// oldest first in endedOrder, so the manager can tell its client why a
	// restore's session is gone (a refused handshake, say) instead of a bare
	// 404. Guarded by mu.
	ended      map[string]string
	endedOrder []string
	keys       map[string]uint32 // cache key → interned id; guarded by mu
	// populating has, per cache key, a channel closed when the session
	// reading that key's recording into the page cache is done; guarded by mu.
	populating map[uint32]chan struct{}
	// plans holds, per cache key, the plan of the recording its sessions
	// last replayed (plan.go), while a session of the key is left; guarded
	// by mu.
	plans    map[uint32]*replayPlan
	draining bool          // guarded by mu
	drained  chan struct{} // closed when draining and no session is left; guarded by mu (the close)
	closed   bool          // Serve returned: no new sessions; guarded by mu
}

// NewServer takes the pager dir (an exclusive flock on it, so two pagers
// never share one), listens on the control socket and writes the pid file.
func NewServer(cfg Config, log *slog.Logger) (*Server, error) {
	if cfg.AcceptTimeout <= 0 {
		cfg.AcceptTimeout = 30 * time.Second
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.Root == "" {
		cfg.Root = filepath.Dir(filepath.Dir(filepath.Clean(cfg.Dir)))
	}
	if err := os.MkdirAll(filepath.Join(cfg.Dir, sessionsDirName), 0o700); err != nil {
		return nil, fmt.Errorf("pager %s: %w", cfg.Dir, err)
	}
	// The pager creates sockets and reads mem-files here as root: nobody
	// else may be able to plant anything in its dir.
	for _, d := range []string{cfg.Dir, filepath.Join(cfg.Dir, sessionsDirName)} {
		if err := datadir.Check(d); err != nil {
			return nil, fmt.Errorf("pager %s: %w", cfg.Dir, err)
		}
	}
	lock, err := os.Open(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("pager %s: %w", cfg.Dir, err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("pager %s: another pager holds this directory (see %s)", cfg.Dir, PidFile(cfg.Dir))
		}
		return nil, fmt.Errorf("pager %s: lock: %w", cfg.Dir, err)
	}
	// We hold the lock: whatever sockets are left belong to a dead pager.
	ctl := ControlSocket(cfg.Dir)
	os.Remove(ctl)
	if stale, _ := filepath.Glob(filepath.Join(cfg.Dir, sessionsDirName, "*.sock")); len(stale) > 0 {
		for _, p := range stale {
			os.Remove(p)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: ctl, Net: "unix"})
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("pager %s: listen: %w", cfg.Dir, err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(ctl, 0o600); err != nil {
		ln.Close()
		lock.Close()
		return nil, fmt.Errorf("pager %s: %w", cfg.Dir, err)
	}
	if err := atomicfile.WriteFile(PidFile(cfg.Dir), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		ln.Close()
		lock.Close()
		return nil, fmt.Errorf("pager %s: %w", cfg.Dir, err)
	}
	s := &Server{
		cfg: cfg, log: log, cache: newPageCache(cfg.CacheBytes),
		memMaps: newMemMaps(cfg.privateMemMaps, cfg.unmapSharedEarly),
		dirLock: lock, ln: ln,
		sessions: make(map[string]*session), keys: make(map[string]uint32), ended: make(map[string]string),
		populating: make(map[uint32]chan struct{}), plans: make(map[uint32]*replayPlan),
		drained: make(chan struct{}),
	}
	s.http = &http.Server{Handler: s.routes(), ReadHeaderTimeout: 10 * time.Second}
	return s, nil
}

// Serve answers the control API until ctx ends or a drain completes. On
// return every session has ended and been freed, and the control socket
// and pid file are gone. Ending on ctx freezes VMs still being served;
// Drain is the graceful way.
func (s *Server) Serve(ctx context.Context) error {
	s.log.Info("pager serving", "dir", s.cfg.Dir, "version", s.cfg.Version, "cache_bytes", s.cfg.CacheBytes, "pid", os.Getpid())
	errc := make(chan error, 1)
	go func() { errc <- s.http.Serve(s.ln) }()
	var err error
	select {
	case <-ctx.Done():
		s.log.Info("pager stopping", "cause", context.Cause(ctx))
	case <-s.drained:
		s.log.Info("pager drained: last session closed")
	case err = <-errc:
		err = fmt.Errorf("pager %s: control API: %w", s.cfg.Dir, err)
	}
	s.mu.Lock()
	s.closed = true
	live := make([]*session, 0, len(s.sessions))
	for _, ss := range s.sessions {
		if ss != nil {
			live = append(live, ss)
		}
	}
	s.mu.Unlock()
	for _, ss := range live {
		ss.cancel(errShutdown)
	}
	s.sessionWG.Wait()
	shutCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s.http.Shutdown(shutCtx)
	os.Remove(PidFile(s.cfg.Dir))
	s.dirLock.Close() // releases the flock
	return err
}

// Drain refuses new sessions from now on; Serve returns once the last
// session has closed (at once if there is none).
func (s *Server) Drain() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.draining {
		s.log.Info("pager draining", "sessions", len(s.sessions))
	}
	s.draining = true
	s.checkDrainedLocked()
}

func (s *Server) checkDrainedLocked() {
	if s.draining && len(s.sessions) == 0 {
		select {
		case <-s.drained:
		default:
			close(s.drained)
		}
	}
}

// Request errors, mapped to HTTP status in one place (api.go).
var (
	errInvalid  = errors.New("invalid request")
	errNotFound = errors.New("not found")
	errExists   = errors.New("already exists")
	errDraining = errors.New("pager is draining")
	errConflict = errors.New("conflict")
)

// SessionRequest is POST /sessions.
type SessionRequest struct {
	SessionID   string `json:"session_id"`
	BackingPath string `json:"backing_path"`
	CacheKey    string `json:"cache_key"`
	// RecordPages, when > 0, logs the first fault of up to this many pages
	// (4 KiB units), in order: GET /sessions/{id}/recording returns them
	// as a working-set recording of cache_key (internal/prefetch).
	RecordPages int `json:"record_pages,omitempty"`
	// PrefetchPath names a working-set recording of cache_key to replay:
	// its pages are installed in order alongside demand faults. A
	// recording that cannot be used (missing, corrupt, another key) is
	// reported in the session's prefetch stats and the session is served
	// without it.
	PrefetchPath string `json:"prefetch_path,omitempty"`
	// SocketDir, when set, is where the session socket is made instead of
	// the pager's sessions/ directory: a jailed VMM's jail root, the only
	// place it can name. It must be a directory inside the data dir reached
	// through no symlink; it is used through a handle opened then, so a VMM
	// that owns it cannot redirect the socket by swapping a name.
	SocketDir string `json:"socket_dir,omitempty"`
	// SocketOwner, with SocketDir, is given the socket file (fchownat, no
	// symlink followed): the jailed VMM's uid and gid, so it may connect.
	SocketOwner *SocketOwner `json:"socket_owner,omitempty"`
}

// SocketOwner is the uid and gid a session socket is given.
type SocketOwner struct {
	UID int `json:"uid"`
	GID int `json:"gid"`
}

// Session is POST /sessions' reply.
type Session struct {
	SessionID  string `json:"session_id"`
	SocketPath string `json:"socket_path"`
}

// createSession opens the mem-file, maps its holes and listens on the
// session socket; the VMM may connect as soon as it returns.
func (s *Server) createSession(req SessionRequest) (Session, error) {
	if err := guestdir.ValidID(req.SessionID); err != nil {
		return Session{}, fmt.Errorf("create session: %w: %v", errInvalid, err)
	}
	if req.BackingPath == "" || !filepath.IsAbs(req.BackingPath) {
		return Session{}, fmt.Errorf("create session %s: %w: backing_path %q must be an absolute path", req.SessionID, errInvalid, req.BackingPath)
	}
	if req.CacheKey == "" {
		return Session{}, fmt.Errorf("create session %s: %w: cache_key is required", req.SessionID, errInvalid)
	}
	if req.RecordPages < 0 || req.RecordPages > prefetch.MaxPages {
		return Session{}, fmt.Errorf("create session %s: %w: record_pages %d: want 0 to %d", req.SessionID, errInvalid, req.RecordPages, prefetch.MaxPages)
	}
	if req.PrefetchPath != "" && !filepath.IsAbs(req.PrefetchPath) {
		return Session{}, fmt.Errorf("create session %s: %w: prefetch_path %q must be an absolute path", req.SessionID, errInvalid, req.PrefetchPath)
	}
	for _, p := range []struct{ what, path string }{{"backing_path", req.BackingPath}, {"prefetch_path", req.PrefetchPath}} {
		if p.path != "" && !inside(s.cfg.Root, p.path) {
			return Session{}, fmt.Errorf("create session %s: %w: %s %q is not inside the data dir %s", req.SessionID, errInvalid, p.what, p.path, s.cfg.Root)
		}
	}
	if req.PrefetchPath != "" && req.RecordPages > 0 {
		return Session{}, fmt.Errorf("create session %s: %w: a session records or replays a working set, not both", req.SessionID, errInvalid)
	}
	if req.SocketOwner != nil && req.SocketDir == "" {
		return Session{}, fmt.Errorf("create session %s: %w: socket_owner needs socket_dir", req.SessionID, errInvalid)
	}
	sock := sessionSocket(s.cfg.Dir, req.SessionID)
	if req.SocketDir != "" {
		// Bound through the directory's handle (/proc/self/fd/N/<name>),
		// so only the name counts against the kernel's limit.
		sock = filepath.Join(req.SocketDir, req.SessionID+".sock")
	} else if len(sock) > guestdir.MaxSocketPath {
		return Session{}, fmt.Errorf("create session %s: %w: socket path %s is longer than %d bytes", req.SessionID, errInvalid, sock, guestdir.MaxSocketPath)
	}
	s.mu.Lock()
	switch {
	case s.draining || s.closed:
		s.mu.Unlock()
		return Session{}, fmt.Errorf("create session %s: %w: start the current version's pager", req.SessionID, errDraining)
	case s.sessions[req.SessionID] != nil:
		s.mu.Unlock()
		return Session{}, fmt.Errorf("create session %s: %w", req.SessionID, errExists)
	}
	// Reserve the id while we open files outside the lock.
	s.sessions[req.SessionID] = nil
	s.mu.Unlock()
	ss, err := s.openSession(req, sock)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil && s.closed {
		ss.ln.Close()
		os.Remove(ss.sockPath)
		ss.closeSockDir()
		ss.backing.Close()
		err = fmt.Errorf("create session %s: %w: the pager is shutting down", req.SessionID, errDraining)
	}
	if err != nil {
		delete(s.sessions, req.SessionID)
		s.checkDrainedLocked()
		return Session{}, err
	}
	s.sessions[req.SessionID] = ss
	s.sessionsTotal.Add(1)
	s.sessionWG.Add(1)
	go func() {
		defer s.sessionWG.Done()
		ss.run()
	}()
	return Session{SessionID: req.SessionID, SocketPath: sock}, nil
}

// inside reports whether path is strictly inside root (textually, after
// cleaning); openSession then opens the backing file with no symlink below
// root.
func inside(root, path string) bool {
	root, path = filepath.Clean(root), filepath.Clean(path)
	return strings.HasPrefix(path, strings.TrimSuffix(root, "/")+"/")
}

func (s *Server) openSession(req SessionRequest, sock string) (*session, error) {
	f, err := hostpath.OpenBeneath("backing_path", s.cfg.Root, req.BackingPath)
	if err != nil {
		return nil, fmt.Errorf("create session %s: %w: %v", req.SessionID, errInvalid, err)
	}
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("create session %s: %w: backing %s is not a regular file", req.SessionID, errInvalid, req.BackingPath)
	}
	data, err := dataMap(f, st.Size())
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("create session %s: %w", req.SessionID, err)
	}
	// In a socket_dir, every use of the socket's name goes through the
	// directory's handle (/proc/self/fd/N/<name>), never through the path.
	var sockDir *os.File
	bindPath := sock
	if req.SocketDir != "" {
		if sockDir, err = hostpath.OpenDirBeneath("socket_dir", s.cfg.Root, req.SocketDir); err != nil {
			f.Close()
			return nil, fmt.Errorf("create session %s: %w: %v", req.SessionID, errInvalid, err)
		}
		bindPath = fmt.Sprintf("/proc/self/fd/%d/%s", sockDir.Fd(), filepath.Base(sock))
	}
	fail := func(err error) (*session, error) {
		f.Close()
		if sockDir != nil {
			sockDir.Close()
		}
		return nil, fmt.Errorf("create session %s: %w", req.SessionID, err)
	}
	os.Remove(bindPath) // a socket left by a session of the same id that crashed
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: bindPath, Net: "unix"})
	if err != nil {
		return fail(fmt.Errorf("listen: %w", err))
	}
	ln.SetUnlinkOnClose(false) // free() removes it; accept removes it early
	if o := req.SocketOwner; o != nil {
		if err := unix.Fchownat(int(sockDir.Fd()), filepath.Base(sock), o.UID, o.GID, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			ln.Close()
			os.Remove(bindPath)
			return fail(fmt.Errorf("give the socket to uid %d: %w", o.UID, err))
		}
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	ss := &session{
		srv: s, id: req.SessionID, cacheKey: req.CacheKey, keyID: s.internKey(req.CacheKey),
		backingPath: req.BackingPath, backing: f, backingSize: st.Size(), backingID: fileMapIDOf(st), data: data,
		sockPath: bindPath, sockDir: sockDir, ln: ln, ctx: ctx, cancel: cancel, done: make(chan struct{}),
		created: time.Now(), recordMax: req.RecordPages,
		state: stateWaiting,
		log:   s.log.With("session", req.SessionID, "cache_key", req.CacheKey),
	}
	if req.PrefetchPath != "" {
		// The session serves without the recording rather than fail: a
		// working set is an optimisation, never a reason a VM cannot run.
		plan, err := s.planFor(req.PrefetchPath, req.CacheKey, ss.keyID, st.Size())
		if err != nil {
			ss.replayErr = err.Error()
			ss.log.Warn("session serves without prefetch", "err", err)
		} else {
			ss.plan, ss.replay = plan, &plan.rec
		}
	}
	ss.log.Info("session created", "backing", req.BackingPath, "size", st.Size(), "data_extents", len(data),
		"record_pages", req.RecordPages, "prefetch_pages", ss.replayPages())
	return ss, nil
}

func (s *Server) internKey(key string) uint32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	id, ok := s.keys[key]
	if !ok {
		id = uint32(len(s.keys) + 1)
		s.keys[key] = id
	}
	return id
}

// liveSiblings is how many sessions other than ss serve ss's cache key
// now: VMs of one snapshot whose pages ss's reads can save a read of.
func (s *Server) liveSiblings(ss *session) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, o := range s.sessions {
		if o != nil && o != ss && o.keyID == ss.keyID {
			n++
		}
	}
	return n
}

// maxEnded bounds how many ended sessions' causes the pager remembers.
const maxEnded = 1024

func (s *Server) removeSession(ss *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sessions[ss.id] == ss {
		delete(s.sessions, ss.id)
		if _, ok := s.ended[ss.id]; !ok {
			s.endedOrder = append(s.endedOrder, ss.id)
		}
		s.ended[ss.id] = context.Cause(ss.ctx).Error()
		if len(s.endedOrder) > maxEnded {
			delete(s.ended, s.endedOrder[0])
			s.endedOrder = s.endedOrder[1:]
		}
		s.dropPlanLocked(ss.keyID)
	}
	s.checkDrainedLocked()
}

func (s *Server) session(id string) (*session, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.sessions[id]
	if ss == nil {
		if cause, ok := s.ended[id]; ok {
			return nil, fmt.Errorf("session %s ended: %s: %w", id, cause, errNotFound)
		}
		return nil, fmt.Errorf("session %s: %w", id, errNotFound)
	}
	return ss, nil
}

// sessionInfo snapshots one session. A session still being created (its id
// only reserved) or already freed is not found: only a session a VMM can
// connect to, or is served by, is reported.
func (s *Server) sessionInfo(id string) (SessionInfo, error) {
	ss, err := s.session(id)
	if err != nil {
		return SessionInfo{}, err
	}
	return ss.info(), nil
}

// sessionRecording is a recording session's first-fault log as a
// working-set recording file.
func (s *Server) sessionRecording(id string) ([]byte, error) {
	ss, err := s.session(id)
	if err != nil {
		return nil, err
	}
	rec, err := ss.recording()
	if err != nil {
		return nil, err
	}
	return prefetch.Encode(rec)
}

// deleteSession ends a session and waits until it has freed everything.
func (s *Server) deleteSession(ctx context.Context, id string) error {
	ss, err := s.session(id)
	if err != nil {
		return err
	}
	ss.cancel(errDeleted)
	select {
	case <-ss.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *Server) populate(ctx context.Context, id string) error {
	ss, err := s.session(id)
	if err != nil {
		return err
	}
	if err := ss.requestPopulate(ctx); err != nil {
		if errors.Is(err, errNotConnected) {
			return fmt.Errorf("populate %s: %w: %v", id, errConflict, err)
		}
		return fmt.Errorf("populate %s: %w", id, err)
	}
	return nil
}

// Health is GET /health.
type Health struct {
	Status   string `json:"status"`
	Version  string `json:"version"`
	Pid      int    `json:"pid"`
	Draining bool   `json:"draining"`
	Sessions int    `json:"sessions"`
}

func (s *Server) health() Health {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Health{Status: "ok", Version: s.cfg.Version, Pid: os.Getpid(), Draining: s.draining, Sessions: s.liveLocked()}
}

func (s *Server) liveLocked() int {
	n := 0
	for _, ss := range s.sessions {
		if ss != nil {
			n++
		}
	}
	return n
}

// Stats snapshots the global and per-session counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	live := make([]*session, 0, len(s.sessions))
	for _, ss := range s.sessions {
		if ss != nil {
			live = append(live, ss)
		}
	}
	draining := s.draining
	s.mu.Unlock()
	st := Stats{
		Version: s.cfg.Version, Pid: os.Getpid(),
		Counters:       s.stats.snapshot(),
		ActiveSessions: len(live), SessionsTotal: s.sessionsTotal.Load(),
		CacheBytes: s.cache.bytes.Load(), CacheBudgetBytes: s.cfg.CacheBytes,
		CacheEntries: s.cache.len(), Evictions: s.cache.evicts.Load(),
		Draining: draining, Sessions: []SessionInfo{},
	}
	for _, ss := range live {
		st.Sessions = append(st.Sessions, ss.info())
	}
	sort.Slice(st.Sessions, func(i, j int) bool { return st.Sessions[i].SessionID < st.Sessions[j].SessionID })
	return st
}

func (s *Server) zeroHugePage() []byte {
	s.zeroOnce.Do(func() { s.zeroHuge = make([]byte, uffd.HugePageSize) })
	return s.zeroHuge
}

// count applies one counter update to the session's and the global counters.
func (ss *session) count(f func(*counters)) {
	f(&ss.stats)
	f(&ss.srv.stats)
}
