package instance

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
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

// ExecName is the name a jailer gives this VMM's exec file, which names the
// directory level every guest lives under (guestdir.Layout.WithExec).
func (s VMMSpec) ExecName() string {
	if s.Emulator {
		return guestdir.ExecEmulator
	}
	return guestdir.ExecFirecracker
}

// ResolveVMM turns the vmm_binary setting into a VMMSpec:
//   - "auto" (or ""): real firecracker only when /dev/kvm AND a firecracker
//     binary in PATH both exist, else this executable's emulator;
//   - "emulator": this executable's emulator;
//   - a path: firecracker, unless its name starts with "forkd" (the emulator).
//
// The emulator stands for Firecracker release emulatorVersion ("" = its
// default, the newest supported); a real firecracker reports its own, which
// every launch reads and checks.
func ResolveVMM(setting, emulatorVersion string) (VMMSpec, error) {
	emuArgs := []string{"vmm"}
	if emulatorVersion != "" {
		emuArgs = append(emuArgs, "--firecracker-version", emulatorVersion)
	}
	self := func() (VMMSpec, error) {
		exe, err := os.Executable()
		if err != nil {
			return VMMSpec{}, fmt.Errorf("resolve vmm: %w", err)
		}
		return VMMSpec{Binary: exe, Args: emuArgs, Emulator: true}, nil
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
		return VMMSpec{Binary: path, Args: emuArgs, Emulator: true}, nil
	}
	return VMMSpec{Binary: path}, nil
}

// launch starts a fresh VMM for an instance at its API socket, inside the
// instance's network namespace if it has one (else, jailed, an empty one):
// through the jailer, with a uid, cgroups and limits of its own, unless VMMs
// run unjailed.
func (m *Manager) launch(ctx context.Context, in store.Instance, g guestdir.Guest) (*firecracker.Process, error) {
	id := in.ID
	spec := firecracker.LaunchSpec{
		Binary:  m.cfg.VMM.Binary,
		Args:    m.cfg.VMM.Args,
		APISock: g.VMMSock(),
		ID:      id,
		LogPath: g.VMMLog(),
		WorkDir: g.Dir,
		NetNS:   m.netNS(in),
	}
	// Never launch a VMM on a disk another name links (the disk guard).
	if err := m.unshareDisk(id, g); err != nil {
		return nil, fmt.Errorf("launch vmm %s: %w", id, err)
	}
	if m.jail != nil {
		holder, err := m.jailArgs(in, g, &spec)
		if err != nil {
			m.releaseJail(id)
			return nil, fmt.Errorf("launch vmm %s: %w", id, err)
		}
		// Launch returns once the VMM answers: its jailer joined the
		// namespace long before, and the VMM now keeps it alive.
		defer closeHolder(holder)
	}
	p, err := firecracker.Launch(ctx, spec)
	if err != nil {
		m.releaseJail(id)
		if serr := sanitizeGuest(g); serr != nil {
			m.log.Warn("launch: clear the jail", "instance", id, "err", serr)
		}
		return nil, fmt.Errorf("launch vmm %s: %w", id, err)
	}
	m.setProc(id, p)
	m.log.Debug("vmm launched", "instance", id, "pid", p.Pid, "firecracker_version", p.Version.String())
	// A VMM that died left its vsock socket (Firecracker never unlinks it),
	// and a boot or a load binding the same path would fail. No other VMM
	// can be using it: Launch refused to start beside a live one.
	if err := os.Remove(g.Vsock()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return p, fmt.Errorf("launch vmm %s: remove stale vsock socket: %w", id, err)
	}
	return p, nil
}

// guestCID is every VM's vsock CID. Firecracker's vsock device is backed by
// Unix sockets of its own, not by the host's vhost-vsock, so CIDs need not
// be unique across VMs; 3 is the lowest a guest may have (0-2 are
// reserved).
const guestCID = 3

// vsockAPI is the instance's vsock device as the API shows it: its CID and
// the host path of its socket (nil for a VM without one).
func (m *Manager) vsockAPI(in store.Instance) *api.Vsock {
	if in.VsockCID == 0 {
		return nil
	}
	g, err := m.layout.Guest(in.ID)
	if err != nil {
		return nil
	}
	return &api.Vsock{CID: in.VsockCID, UDSPath: g.Vsock()}
}

// killVMM kills an instance's VMM (the tracked process, else the recorded
// pid if it is still that VMM) and removes its socket.
func (m *Manager) killVMM(ctx context.Context, id string, pid int, g guestdir.Guest) error {
	// The operation owns the VMM's end: its supervisor must not read the
	// exit as a crash.
	m.unsupervise(id)
	m.stopPrefetch(id) // it follows this VMM
	p := m.proc(id)
	if p == nil && pid > 0 {
		if ap, err := firecracker.Adopt(pid, g.VMMSock()); err == nil {
			p = ap
		} else if ap, err := firecracker.AdoptForKill(pid, id, g.VMMSock()); err == nil {
			// Alive but not answering (hung, or its socket gone): still
			// ours by its --id, and it must be gone before its uid and
			// directory are given to anyone else.
			p = ap
		}
	}
	var err error
	if p != nil {
		err = p.Kill(ctx)
	}
	if err != nil {
		return fmt.Errorf("kill vmm %s: %w", id, err)
	}
	m.setProc(id, nil)
	// The VMM is gone: free its uid and cgroup, and clear what it could
	// have left in its dir (sanitizeGuest also removes its socket).
	m.releaseJail(id)
	if err := sanitizeGuest(g); err != nil {
		return fmt.Errorf("kill vmm %s: %w", id, err)
	}
	return nil
}

// client returns an API client of the instance's VMM. The VMM this manager
// launched or adopted on that socket lends it its version (read by GET
// /version then), so requests are built for the release it runs; without
// one the client asks before the first request that depends on it.
func (m *Manager) client(g guestdir.Guest) *firecracker.Client {
	sock := g.VMMSock()
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, p := range m.procs {
		if p != nil && p.APISock == sock {
			return p.Client()
		}
	}
	return firecracker.NewClient(sock)
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

// stopIfVMMGone settles an instance whose VMM could not be resumed after a
// failed operation (rerr): if the VMM is gone (its exit seen, or its socket
// gone or dropping the request, which happens only as it exits: socketGone;
// a VMM killed in the middle of a snapshot write, whose process may not
// have finished dying), its memory is lost: the instance becomes Stopped
// with the reason and its snapshots dir (which may hold the torn write) is
// removed, as for a VMM found dead by its supervisor. A VMM that is alive
// but refused to resume is left to the caller (Error). Caller holds the
// write lock.
func (m *Manager) stopIfVMMGone(ctx context.Context, in *store.Instance, op string, rerr error) bool {
	p := m.proc(in.ID)
	if p == nil {
		return false
	}
	select {
	case <-p.Done():
	default:
		if !socketGone(rerr) {
			return false
		}
	}
	g, err := m.guest(in.ID)
	if err != nil {
		return false
	}
	// Kill waits until the process is gone (a no-op on a dead one), so its
	// exit is known for the record.
	if err := m.killVMM(ctx, in.ID, p.Pid, g); err != nil {
		m.log.Warn("kill a VMM gone during "+op, "instance", in.ID, "err", err)
	}
	if err := (vmmExited{pid: p.Pid, exit: p.Exit()}).apply(m, ctx, in); err != nil {
		m.log.Error("settle a VMM gone during "+op, "instance", in.ID, "err", err)
	}
	return true
}

// socketGone reports a request that failed because the VMM's API socket
// is gone or going: nobody listens (ECONNREFUSED, ENOENT), or the VMM
// closed the connection mid-request (ECONNRESET, EPIPE, EOF), which its API
// server does only as the process exits. A VMM that is alive but slow
// times out instead, and is never taken for dead.
func socketGone(err error) bool {
	for _, e := range []error{syscall.ECONNREFUSED, syscall.ENOENT, syscall.ECONNRESET, syscall.EPIPE, io.EOF, io.ErrUnexpectedEOF} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// snapshotReleaseHint says what to do when the VMM refused a snapshot
// another Firecracker release wrote: each release loads only its own
// snapshot data format (same major, no newer minor) and answers "Invalid
// data version" otherwise, so after a Firecracker upgrade or downgrade a
// VM on standby cannot be restored until the releases match again. The VM
// stays on standby with its files intact (the restore rolls back). It is
// invalid_state (409), not a fault of forkd's (500): the restore can work
// once the state of the host (its Firecracker) changes.
func snapshotReleaseHint(err error, v firecracker.Version) error {
	var ae *firecracker.APIError
	if !errors.As(err, &ae) || !strings.Contains(ae.FaultMessage, "Invalid data version") {
		return err
	}
	return releaseMismatch{err: err, msg: fmt.Sprintf("%v: the snapshot was written by another Firecracker release, whose snapshot format "+
		"Firecracker %s cannot load; restore it with the release that wrote it (the VM stays on standby), "+
		"or stop and start it to boot afresh without its memory", err, v)}
}

// releaseMismatch is a load refused for another release's snapshot format:
// both the VMM's error and api.ErrInvalidState.
type releaseMismatch struct {
	err error
	msg string
}

func (e releaseMismatch) Error() string   { return e.msg }
func (e releaseMismatch) Unwrap() []error { return []error{e.err, api.ErrInvalidState} }
