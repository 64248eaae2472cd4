package instance

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/store"
)

// VMMSpec is the VMM binary the manager launches.
type VMMSpec struct {
	Binary string
	// Args go before the API flags: {"vmm"} for forkd's emulator.
	Args []string
	// Emulator is true for `forkd vmm`: kernel and rootfs become optional
	// and memory_check reads GET /guest.
	Emulator bool
}

// ResolveVMM turns the vmm_binary setting into a VMMSpec:
//   - "auto" (or ""): real firecracker only when /dev/kvm AND a firecracker
//     binary in PATH both exist, else this executable's emulator;
//   - "emulator": this executable's emulator;
//   - a path: firecracker, unless its name starts with "forkd" (the emulator).
func ResolveVMM(setting string) (VMMSpec, error) {
	self := func() (VMMSpec, error) {
		exe, err := os.Executable()
		if err != nil {
			return VMMSpec{}, fmt.Errorf("resolve vmm: %w", err)
		}
		return VMMSpec{Binary: exe, Args: []string{"vmm"}, Emulator: true}, nil
	}
	switch setting {
	case "", "auto":
		if _, err := os.Stat("/dev/kvm"); err == nil {
			if fc, err := exec.LookPath("firecracker"); err == nil {
				return VMMSpec{Binary: fc}, nil
			}
		}
		return self()
	case "emulator":
		return self()
	}
	path, err := exec.LookPath(setting)
	if err != nil {
		return VMMSpec{}, fmt.Errorf("resolve vmm %q: %w", setting, err)
	}
	if strings.HasPrefix(filepath.Base(path), "forkd") {
		return VMMSpec{Binary: path, Args: []string{"vmm"}, Emulator: true}, nil
	}
	return VMMSpec{Binary: path}, nil
}

// launch starts a fresh VMM for an instance at its API socket, inside the
// instance's network namespace if it has one.
func (m *Manager) launch(ctx context.Context, in store.Instance, g guestdir.Guest) (*firecracker.Process, error) {
	id := in.ID
	if err := os.MkdirAll(g.LogsDir(), 0o755); err != nil {
		return nil, fmt.Errorf("launch vmm %s: %w", id, err)
	}
	p, err := firecracker.Launch(ctx, firecracker.LaunchSpec{
		Binary:  m.cfg.VMM.Binary,
		Args:    m.cfg.VMM.Args,
		APISock: g.VMMSock(),
		ID:      id,
		LogPath: g.VMMLog(),
		WorkDir: g.Dir,
		NetNS:   m.netNS(in),
	})
	if err != nil {
		return nil, fmt.Errorf("launch vmm %s: %w", id, err)
	}
	m.setProc(id, p)
	return p, nil
}

// killVMM kills an instance's VMM (the tracked process, else the recorded
// pid if it is still that VMM) and removes its socket.
func (m *Manager) killVMM(ctx context.Context, id string, pid int, g guestdir.Guest) error {
	p := m.proc(id)
	if p == nil && pid > 0 {
		if ap, err := firecracker.Adopt(pid, g.VMMSock()); err == nil {
			p = ap
		}
	}
	var err error
	if p != nil {
		err = p.Kill(ctx)
	}
	m.setProc(id, nil)
	if rerr := os.Remove(g.VMMSock()); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
		err = rerr
	}
	if err != nil {
		return fmt.Errorf("kill vmm %s: %w", id, err)
	}
	return nil
}

func (m *Manager) client(g guestdir.Guest) *firecracker.Client {
	return firecracker.NewClient(g.VMMSock())
}

// memoryCheck asks the VMM how its guest's memory verifies: "ok", the first
// integrity error, or "unknown" when the VMM cannot say (real Firecracker).
func (m *Manager) memoryCheck(ctx context.Context, g guestdir.Guest) string {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c := m.client(g)
	defer c.Close()
	gs, err := c.Guest(ctx)
	if err != nil {
		return "unknown"
	}
	if gs.IntegrityErrors > 0 {
		if gs.FirstIntegrityError != "" {
			return gs.FirstIntegrityError
		}
		return fmt.Sprintf("%d integrity errors", gs.IntegrityErrors)
	}
	return "ok"
}

// settleIfVMMDied notices a VMM that exited under a Running or Paused
// instance (crash, OOM kill): its memory is gone, so the instance becomes
// Stopped with the reason in its error text, instead of every later action
// failing against a dead socket. A Uffd-restored VM whose pager is gone is
// recorded as Error (stop and delete still work). Caller holds the write
// lock.
func (m *Manager) settleIfVMMDied(ctx context.Context, in *store.Instance) {
	if !oneOf(in.State, api.StateRunning, api.StatePaused) {
		return
	}
	if m.pagerGone(ctx, *in) {
		m.log.Warn("pager gone under a uffd-restored VM: instance in Error", "instance", in.ID, "session", in.PagerSession)
		in.State, in.Error, in.MemoryCheck = api.StateError, pagerGoneError(*in), "unknown"
		m.db.UpdateInstance(ctx, *in)
		return
	}
	p := m.proc(in.ID)
	if p == nil || p.Alive() {
		return
	}
	g, err := m.guest(in.ID)
	if err != nil {
		return
	}
	m.log.Warn("VMM exited unexpectedly: instance stopped", "instance", in.ID, "pid", p.Pid, "log", g.VMMLog())
	if err := m.markStopped(ctx, in, g); err != nil {
		m.log.Error("settle dead VMM", "instance", in.ID, "err", err)
	}
	in.Error = fmt.Sprintf("VMM (pid %d) exited unexpectedly; memory lost (see %s)", p.Pid, g.VMMLog())
	m.db.UpdateInstance(ctx, *in)
}

// settleOnRead lets a read (GET, list) report a dead VMM or pager at once
// instead of a stale Running: if the instance's lock is free it settles the
// record as a write would (settleIfVMMDied); if an operation holds the lock,
// that operation will notice, and the read shows the record as is.
func (m *Manager) settleOnRead(ctx context.Context, in store.Instance) store.Instance {
	if !oneOf(in.State, api.StateRunning, api.StatePaused) {
		return in
	}
	p := m.proc(in.ID)
	vmmDead := p != nil && !p.Alive()
	if !vmmDead && in.PagerSession == "" {
		return in
	}
	if !vmmDead && !m.pagerGone(ctx, in) {
		return in
	}
	l := m.instanceLock(in.ID)
	if !l.TryLock() {
		return in
	}
	defer l.Unlock()
	cur, err := m.db.GetInstance(ctx, in.ID)
	if err != nil {
		return in
	}
	m.settleIfVMMDied(ctx, &cur)
	return cur
}
