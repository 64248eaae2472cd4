package instance

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/store"
)

// A supervisor watches one live instance (Running or Paused, with a VMM)
// from the moment an operation makes it live until an operation kills its
// VMM or the supervisor itself settles its end. One goroutine (run) owns
// it; the cause of its end travels through its context (the shape of the
// pager's sessions). It:
//
//   - learns of the VMM's exit as an event (the VMM's Done: the reaper of a
//     child, a pidfd for an adopted VMM), with the wait status when this
//     daemon is the parent;
//   - learns of the death of the pager serving a Uffd VM's memory as an
//     event (a pidfd on the pager process), and asks the pager about its
//     session in the background (a restarted pager answers 404);
//   - refreshes the guest's memory check in the background;
//   - applies what those imply, under the instance's write lock: a VMM that
//     exited makes the instance Stopped with the reason, a pager that is
//     gone makes it Error.
//
// Reads (GET /instances, GET /instances/{id}) only read what it found: they
// never ask a VMM or the pager anything.
type supervisor struct {
	m    *Manager
	id   string
	proc *firecracker.Process
	// pagerVersion and session name the Uffd session serving the VM's
	// memory ("" for a File restore or a boot).
	pagerVersion, session string

	adopted bool // found running by the reconciler: refresh at once

	ctx    context.Context
	cancel context.CancelCauseFunc
	done   chan struct{} // closed when run has returned

	mu    sync.Mutex
	facts guestFacts // guarded by mu
}

// guestFacts is what a supervisor last learned about its VM.
type guestFacts struct {
	// memoryCheck is the guest's last memory check ("ok", the first
	// integrity error, "unknown"), checkedAt when it was read; "" before the
	// first refresh.
	memoryCheck string
	checkedAt   time.Time
	// sessionAsked is when the last completed check of the pager session
	// began (zero for a VM without one).
	sessionAsked time.Time
}

// errUnsupervised is the cause a supervisor ends with when an operation
// takes over its VMM (or another supervisor replaces it).
var errUnsupervised = errors.New("an operation took over the VMM")

// defaultSuperviseInterval is how often a supervisor refreshes its VM's
// memory check and asks the pager about its session.
const defaultSuperviseInterval = 5 * time.Second

// supervise starts watching a live instance whose record says Running or
// Paused with VMM p. It replaces any supervisor the instance had. adopted
// says the VMM was found running by the reconciler (its pager may have died
// while the daemon was down): its first refresh runs at once. Caller holds
// the instance's write lock.
func (m *Manager) supervise(in store.Instance, p *firecracker.Process, adopted bool) {
	ctx, cancel := context.WithCancelCause(m.ctx)
	s := &supervisor{
		m: m, id: in.ID, proc: p, pagerVersion: in.PagerVersion, session: in.PagerSession,
		ctx: ctx, cancel: cancel, done: make(chan struct{}), adopted: adopted,
	}
	m.mu.Lock()
	old := m.sups[in.ID]
	m.sups[in.ID] = s
	m.mu.Unlock()
	if old != nil {
		old.cancel(errUnsupervised)
	}
	m.supWG.Add(1)
	go func() {
		defer m.supWG.Done()
		s.run()
	}()
}

// unsupervise stops an instance's supervisor without waiting for it: the
// caller (an operation holding the write lock) now owns the VMM's fate.
func (m *Manager) unsupervise(id string) {
	m.mu.Lock()
	s := m.sups[id]
	delete(m.sups, id)
	m.mu.Unlock()
	if s != nil {
		s.cancel(errUnsupervised)
	}
}

func (m *Manager) supervisorOf(id string) *supervisor {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.sups[id]
}

// factsOf returns what the supervisor of id last learned (zero without one).
func (m *Manager) factsOf(id string) guestFacts {
	s := m.supervisorOf(id)
	if s == nil {
		return guestFacts{}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.facts
}

// run is the supervisor's life.
func (s *supervisor) run() {
	defer close(s.done)
	defer s.proc.Release() // an adopted VMM's pidfd
	if s.pagerVersion != "" {
		// A hold point for tests (their faultHook); it injects no error.
		_ = s.m.fault("supervise:pager-watch")
	}
	pagerExit := s.m.pagerExit(s.ctx, s.pagerVersion)
	interval := s.m.cfg.SuperviseInterval
	tick := time.NewTicker(interval)
	defer tick.Stop()
	// A first look at once for a VMM adopted after a restart: its pager may
	// have died while the daemon was down.
	if s.adopted && s.refresh() {
		return
	}
	// And a first question to the pager for every Uffd VM, asked after the
	// watch above is in place: the pager that took the session at the
	// restore may have died before the watch began, and the watch then
	// follows the pager started since, which will never exit for this VM
	// (seen under reliability's pager chaos: a VM Running on a dead session
	// until the next tick). From here on, either that pager serves the
	// session and its death is an event, or the question finds it gone.
	if !s.adopted && s.sessionLost() {
		return
	}
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-s.proc.Done():
			s.settle(vmmExited{pid: s.proc.Pid, exit: s.proc.Exit()})
			return
		case <-pagerExit:
			pagerExit = nil
			if s.settle(pagerLost{version: s.pagerVersion, session: s.session, why: "its process exited"}) {
				return
			}
		case <-tick.C:
			if s.refresh() {
				return
			}
		}
	}
}

// sessionLost asks the pager whether it still serves a Uffd VM's session,
// and settles the VM in Error if it does not. It returns true when the
// supervisor is done; false for a VM without a session.
func (s *supervisor) sessionLost() bool {
	if s.pagerVersion == "" || s.session == "" {
		return false
	}
	if !s.m.sessionGone(s.ctx, s.pagerVersion, s.session) {
		return false
	}
	return s.settle(pagerLost{version: s.pagerVersion, session: s.session, why: "it no longer serves the session"})
}

// refresh reads the guest's memory check and, for a Uffd VM, asks the
// pager whether it still serves the session. It does I/O with short
// timeouts and holds no lock. It returns true when the supervisor is done.
func (s *supervisor) refresh() bool {
	var asked time.Time
	if s.pagerVersion != "" && s.session != "" {
		asked = time.Now()
		if s.sessionLost() {
			return true
		}
	}
	g, err := s.m.guest(s.id)
	if err != nil {
		return false
	}
	check := s.m.memoryCheck(s.ctx, g)
	if s.ctx.Err() != nil {
		return true
	}
	s.mu.Lock()
	prev := s.facts.memoryCheck
	s.facts = guestFacts{memoryCheck: check, checkedAt: time.Now(), sessionAsked: asked}
	s.mu.Unlock()
	if check != prev && check != "ok" && check != "unknown" {
		s.m.log.Error("guest memory integrity error", "instance", s.id, "memory_check", check)
		if in, err := s.m.db.GetInstance(s.ctx, s.id); err == nil {
			s.m.failed(in.ID, in.Name, in.State, "guest memory integrity error: "+check)
		}
	}
	return false
}

// endCause is what a supervisor found: a reason the instance can no longer
// be Running or Paused.
type endCause interface {
	apply(m *Manager, ctx context.Context, in *store.Instance) error
	error
}

// vmmExited: the VMM process ended under a live instance (a crash, the OOM
// killer, a kill from outside). Its memory is gone: Stopped, with why; or
// Error when its jail says it was killed for breaking a rule (a system call
// its seccomp filter denies, its cgroup's memory limit), with that cause
// first.
type vmmExited struct {
	pid  int
	exit firecracker.Exit
}

func (e vmmExited) Error() string {
	return fmt.Sprintf("VMM (pid %d) %s; memory lost", e.pid, e.exit)
}

func (e vmmExited) apply(m *Manager, ctx context.Context, in *store.Instance) error {
	g, err := m.guest(in.ID)
	if err != nil {
		return err
	}
	// Read before the VMM's cgroup (and its oom counter) is removed.
	if cause := m.exitCause(in.ID, e.exit); cause != "" {
		m.log.Error("VMM killed by its jail: instance in Error", "instance", in.ID, "pid", e.pid, "exit", e.exit.String(), "cause", cause, "log", g.VMMLog())
		killErr := m.killVMM(ctx, in.ID, 0, g)
		m.closeSession(ctx, in)
		in.State, in.Pid, in.MemoryCheck = api.StateError, 0, "unknown"
		in.Error = fmt.Sprintf("%s (VMM pid %d %s; memory lost; see %s)", cause, e.pid, e.exit, g.VMMLog())
		return errors.Join(killErr, m.db.UpdateInstance(ctx, *in))
	}
	m.log.Warn("VMM exited unexpectedly: instance stopped", "instance", in.ID, "pid", e.pid, "exit", e.exit.String(), "log", g.VMMLog())
	in.Error = fmt.Sprintf("%s (see %s)", e.Error(), g.VMMLog())
	return m.markStopped(ctx, in, g)
}

// pagerLost: the pager serving a Uffd VM's memory is gone. The VM freezes at
// its next fault of a page not yet served: Error (stop and delete work).
type pagerLost struct {
	version, session, why string
}

func (e pagerLost) Error() string {
	return fmt.Sprintf("the pager (version %s) serving this VM's memory through session %s is gone (%s): "+
		"the VM is frozen at its next page fault; stop or delete it", e.version, e.session, e.why)
}

func (e pagerLost) apply(m *Manager, ctx context.Context, in *store.Instance) error {
	m.log.Warn("pager gone under a uffd-restored VM: instance in Error", "instance", in.ID, "session", e.session, "why", e.why)
	in.State, in.Error, in.MemoryCheck = api.StateError, e.Error(), "unknown"
	return m.db.UpdateInstance(ctx, *in)
}

// settle applies cause under the instance's write lock, if the instance is
// still live on this supervisor's VMM (an operation may have changed it
// while the lock was being waited for). It reports whether the supervisor
// is done.
func (s *supervisor) settle(cause endCause) bool {
	l := s.m.instanceLock(s.id)
	if !lockOrCancel(s.ctx, l) {
		return true
	}
	defer l.Unlock()
	if s.m.supervisorOf(s.id) != s {
		return true
	}
	ctx := context.WithoutCancel(s.ctx)
	in, err := s.m.db.GetInstance(ctx, s.id)
	if err != nil {
		return true
	}
	if !oneOf(in.State, api.StateRunning, api.StatePaused) || in.Pid != s.proc.Pid {
		return true
	}
	s.m.unsupervise(s.id)
	if err := cause.apply(s.m, ctx, &in); err != nil {
		s.m.log.Error("settle a live instance", "instance", s.id, "cause", cause.Error(), "err", err)
	}
	return true
}

// lockOrCancel takes l for writing unless ctx ends first. The lock may be
// held by an operation for minutes (a large standby); a supervisor must
// not outlive the manager waiting for it.
func lockOrCancel(ctx context.Context, l *sync.RWMutex) bool {
	locked := make(chan struct{})
	go func() {
		l.Lock()
		close(locked)
	}()
	select {
	case <-locked:
		if ctx.Err() != nil {
			l.Unlock()
			return false
		}
		return true
	case <-ctx.Done():
		// Whoever holds the lock will release it; give it straight back.
		go func() {
			<-locked
			l.Unlock()
		}()
		return false
	}
}

// settleNoticed applies, under the write lock an operation just took, what
// the instance's supervisor knows and has not yet applied (it may be waiting
// for this very lock): a VMM that has exited. It does no I/O but the
// record's write. Caller holds the write lock.
func (m *Manager) settleNoticed(ctx context.Context, in *store.Instance) {
	if !oneOf(in.State, api.StateRunning, api.StatePaused) {
		return
	}
	p := m.proc(in.ID)
	if p == nil || p.Pid != in.Pid {
		return
	}
	select {
	case <-p.Done():
	default:
		return
	}
	m.unsupervise(in.ID)
	if err := (vmmExited{pid: p.Pid, exit: p.Exit()}).apply(m, ctx, in); err != nil {
		m.log.Error("settle a dead VMM", "instance", in.ID, "err", err)
	}
}
