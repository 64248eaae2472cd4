package pager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/uffd"
)

// Session states, as GET /stats and GET /sessions/{id} show them.
const (
	stateWaiting   = "waiting"   // listening for the VMM to connect
	stateHandshake = "handshake" // connected, reading the handshake
	stateServing   = "serving"   // serving faults
	statePopulated = "populated" // every page installed, ranges unregistered
)

// Causes a session ends with (logged; the session's context carries them).
var (
	errVMMExited    = errors.New("the VMM closed the session socket (exited)")
	errDeleted      = errors.New("session deleted through the control API")
	errShutdown     = errors.New("pager shutting down")
	errVMMGone      = errors.New("the VMM's memory is gone (ESRCH)")
	errNotConnected = errors.New("no VMM has connected to this session yet")
)

// session is one VM restore: a socket the VMM connects to, the uffd it
// hands over, and the mem-file behind it. run is its owner goroutine; it
// frees everything when it returns.
type session struct {
	srv         *Server
	log         *slog.Logger
	id          string
	cacheKey    string
	keyID       uint32
	backingPath string
	backing     *os.File
	backingSize int64
	backingID   fileMapID // backing's inode and size, as opened: its shared mapping's name (memmap.go)
	data        extents   // data extents of backing, taken at open; elsewhere are holes
	sockPath    string    // the socket's name, through sockDir's handle when there is one
	sockDir     *os.File  // the socket_dir the socket was made in, nil for sessions/
	ln          *net.UnixListener

	ctx    context.Context
	cancel context.CancelCauseFunc
	done   chan struct{} // closed when run has freed everything

	created   time.Time
	recordMax int                 // log the first faults of this many 4 KiB pages (0: none)
	replay    *prefetch.Recording // the working set to install, nil for none (plan.rec: shared, read only)
	plan      *replayPlan         // replay's plan, shared by the sessions of the recording
	replayErr string              // why a requested recording is not replayed

	stats counters
	// pf is the session's prefetch progress, read by stats.
	pf prefetchCounters

	recMu    sync.Mutex
	recStart time.Time // serving started: the recording's window begins; guarded by recMu
	recPages []uint64  // first faults, in order (4 KiB page indices); guarded by recMu

	mu          sync.Mutex
	state       string             // guarded by mu
	pid         int                // VMM pid from SO_PEERCRED; guarded by mu
	regions     []uffd.Region      // guarded by mu
	populate    []chan error       // waiting populate requests; guarded by mu
	waitCancel  context.CancelFunc // cancels the serve loop's current wait; guarded by mu
	pendingKick bool               // a kick arrived while not waiting; guarded by mu
}

// info snapshots the session for GET /stats and GET /sessions/{id}.
func (s *session) info() SessionInfo {
	s.mu.Lock()
	st := SessionInfo{
		SessionID: s.id, CacheKey: s.cacheKey, BackingPath: s.backingPath,
		State: s.state, Pid: s.pid, Regions: len(s.regions),
	}
	for _, r := range s.regions {
		st.MemoryBytes += r.Size
	}
	s.mu.Unlock()
	st.Counters = s.stats.snapshot()
	st.Prefetch = s.prefetchInfo()
	return st
}

// kick wakes the serve loop out of its wait so it looks at new requests.
func (s *session) kick() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.waitCancel != nil {
		s.waitCancel()
	} else {
		s.pendingKick = true
	}
}

// requestPopulate queues a populate and waits for the serve loop to finish it.
func (s *session) requestPopulate(ctx context.Context) error {
	reply := make(chan error, 1)
	s.mu.Lock()
	switch s.state {
	case stateWaiting, stateHandshake:
		s.mu.Unlock()
		return errNotConnected
	case statePopulated:
		s.mu.Unlock()
		return nil
	}
	s.populate = append(s.populate, reply)
	s.mu.Unlock()
	s.kick()
	select {
	case err := <-reply:
		return err
	case <-s.done:
		return fmt.Errorf("session ended before populate finished: %w", context.Cause(s.ctx))
	case <-ctx.Done():
		return ctx.Err()
	}
}

// run is the session's life: accept, handshake, serve, free.
func (s *session) run() {
	defer s.free()
	// The disk starts on a replayed working set while the VMM is launched.
	raDone := make(chan struct{})
	go func() {
		defer close(raDone)
		s.readAhead()
	}()
	defer func() { <-raDone }() // before free closes the mem-file
	conn, err := s.accept()
	if err != nil {
		s.cancel(err)
		level := slog.LevelError
		if errors.Is(err, errDeleted) || errors.Is(err, errShutdown) {
			level = slog.LevelInfo
		}
		s.log.Log(context.Background(), level, "session ended: no VMM connected", "op", "accept", "err", err)
		return
	}
	defer conn.Close()
	s.mu.Lock()
	s.state = stateHandshake
	s.mu.Unlock()
	// DELETE or shutdown during the handshake must not wait out its timeout.
	stopConn := context.AfterFunc(s.ctx, func() { conn.Close() })
	defer stopConn()
	regions, fds, err := uffd.ReceiveHandshake(conn, s.srv.cfg.HandshakeTimeout)
	if err != nil {
		s.cancel(err)
		s.log.Error("session ended: bad handshake", "op", "handshake", "err", err)
		return
	}
	for _, fd := range fds[1:] {
		unix.Close(fd) // a guest-memory memfd from e2b-style senders; unused here
	}
	f := uffd.FromFD(fds[0])
	defer f.Close()
	if err := s.checkRegions(regions); err != nil {
		s.cancel(err)
		s.log.Error("session ended: bad handshake", "op", "handshake", "err", err)
		return
	}
	pid := peerPid(conn)
	s.mu.Lock()
	s.state, s.pid, s.regions = stateServing, pid, regions
	s.mu.Unlock()
	s.log.Info("session serving", "pid", pid, "regions", len(regions))

	pidfd := s.openPidfd(pid)
	watchDone := make(chan struct{}, 2)
	go func() {
		defer func() { watchDone <- struct{}{} }()
		s.watch(conn, pidfd != nil)
	}()
	go func() {
		defer func() { watchDone <- struct{}{} }()
		s.watchPid(pid, pidfd)
	}()
	err = s.serve(s.ctx, f, regions)
	if err != nil {
		s.cancel(err)
	}
	conn.Close() // unblocks watch; the cancel above or before unblocks watchPid
	<-watchDone
	<-watchDone
	cause := context.Cause(s.ctx)
	switch {
	case errors.Is(cause, errVMMExited), errors.Is(cause, errDeleted), errors.Is(cause, errShutdown):
		s.log.Info("session ended", "cause", cause.Error())
	default:
		s.log.Error("session ended", "cause", cause.Error())
	}
}

// accept waits for the one connection of this session, bounded by the
// accept timeout (the VMM may die before it connects) and the session's
// context. The socket file is removed once the VMM is in: nobody else may
// connect.
func (s *session) accept() (*net.UnixConn, error) {
	stop := context.AfterFunc(s.ctx, func() { s.ln.Close() })
	defer stop()
	if err := s.ln.SetDeadline(time.Now().Add(s.srv.cfg.AcceptTimeout)); err != nil {
		return nil, err
	}
	conn, err := s.ln.AcceptUnix()
	s.ln.Close()
	os.Remove(s.sockPath)
	if err != nil {
		if c := context.Cause(s.ctx); c != nil {
			return nil, c
		}
		return nil, fmt.Errorf("accept on %s: %w", s.sockPath, err)
	}
	return conn, nil
}

// checkRegions refuses regions the mem-file cannot back: reading past EOF
// would give the guest short pages.
func (s *session) checkRegions(regions []uffd.Region) error {
	for i, r := range regions {
		if r.Offset+r.Size > uint64(s.backingSize) {
			return fmt.Errorf("region %d (offset %d, size %d) ends past the end of %s (%d bytes)",
				i, r.Offset, r.Size, s.backingPath, s.backingSize)
		}
	}
	return nil
}

func peerPid(conn *net.UnixConn) int {
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0
	}
	pid := 0
	rc.Control(func(fd uintptr) {
		if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
			pid = int(cred.Pid)
		}
	})
	return pid
}

// watch reads the session socket until it closes. Firecracker never writes
// after the handshake, so any data is a protocol error. From 1.12 it keeps
// the socket until it exits, so EOF means the VMM is gone (the uffd itself
// reports nothing when its owner exits); releases before 1.12 close it
// right after the handshake and go on running. So with a pidfd watching
// the VMM (havePidfd), EOF is left to the pidfd; without one it is the
// only exit signal there is.
func (s *session) watch(conn *net.UnixConn, havePidfd bool) {
	buf := make([]byte, 512)
	n, err := conn.Read(buf)
	switch {
	case n > 0:
		s.cancel(fmt.Errorf("protocol error: %d unexpected bytes after the handshake (one handshake message per session)", n))
	case (errors.Is(err, io.EOF) || errors.Is(err, unix.ECONNRESET)) && havePidfd:
		s.log.Debug("the VMM closed the session socket (Firecracker < 1.12 does after the handshake); its pidfd tells its exit")
	case errors.Is(err, io.EOF), errors.Is(err, unix.ECONNRESET):
		s.cancel(errVMMExited)
	default:
		if s.ctx.Err() == nil {
			s.cancel(fmt.Errorf("session socket: %w", err))
		}
	}
}

// openPidfd pins the VMM process (the peer of the handshake) so its exit
// can be seen; nil when the kernel has no pidfds or the VMM is already
// gone (then the socket's EOF is the signal).
func (s *session) openPidfd(pid int) *os.File {
	if pid <= 0 {
		return nil
	}
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		s.log.Debug("no pidfd for the VMM; relying on the socket's EOF", "pid", pid, "err", err)
		return nil
	}
	return os.NewFile(uintptr(fd), "pidfd")
}

// watchPid ends the session when the VMM process exits, seen through its
// pidfd f (nil: nothing to watch): it covers a VMM whose socket outlives it
// (inherited by a child) and one that closed the socket early (< 1.12).
func (s *session) watchPid(pid int, f *os.File) {
	if f == nil {
		return
	}
	stop := context.AfterFunc(s.ctx, func() { f.Close() })
	defer stop()
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	// A pidfd is readable once the process has exited. Check the level
	// inside the wait (see uffd.FD.WaitReadable for why).
	err = rc.Read(func(fd uintptr) bool {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, 0)
		return err == nil && n > 0
	})
	if err == nil {
		s.cancel(fmt.Errorf("%w (pid %d exited)", errVMMExited, pid))
	}
}

// closeSockDir closes the handle of the socket's directory, once the socket
// is gone. Safe to call twice.
func (s *session) closeSockDir() {
	if s.sockDir != nil {
		s.sockDir.Close()
		s.sockDir = nil
	}
}

// free releases everything the session holds and unregisters it.
func (s *session) free() {
	s.cancel(errShutdown) // no-op if a cause is already set
	s.ln.Close()
	os.Remove(s.sockPath)
	s.closeSockDir()
	s.backing.Close()
	s.mu.Lock()
	waiters := s.populate
	s.populate = nil
	s.mu.Unlock()
	for _, w := range waiters {
		w <- fmt.Errorf("session ended: %w", context.Cause(s.ctx))
	}
	s.srv.removeSession(s)
	close(s.done)
}
