package emulator

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/forkd/forkd/internal/guestnet"
	"github.com/forkd/forkd/internal/hostpath"
	"github.com/forkd/forkd/internal/uffd"
	"github.com/forkd/forkd/internal/version"
)

// fault is an error whose text is the fault_message Firecracker would send.
type fault string

func (f fault) Error() string { return string(f) }

func faultf(format string, args ...any) error { return fault(fmt.Sprintf(format, args...)) }

// Firecracker's messages for its ordering rules.
const (
	errPostBoot   fault = "The requested operation is not supported after starting the microVM."
	errPreBoot    fault = "The requested operation is not supported before starting the microVM."
	errLoadAfter  fault = "Loading a microVM snapshot not allowed after configuring boot-specific resources."
	errNoKernel   fault = "Cannot start microvm without kernel configuration."
	errUnusable   fault = "The microVM is unusable: a snapshot load failed. Start a new VMM process."
	errNotStopped fault = "Cannot create a snapshot: the microVM must be paused first (PATCH /vm {\"state\": \"Paused\"})."
)

type runState int

const (
	stateNotStarted runState = iota
	stateRunning
	statePaused
	stateFailed // a load failed: every later action is refused
)

func (s runState) String() string {
	switch s {
	case stateRunning:
		return "Running"
	case statePaused:
		return "Paused"
	default:
		return "Not started"
	}
}

// vmm is one microVM. Firecracker runs every API action on its single VMM
// thread; mu gives the same serialisation.
type vmm struct {
	id      string
	version string          // GET / vmm_version
	rel     release         // the Firecracker release emulated
	snap    snapshotVersion // its snapshot data version
	crashAt string          // Config.CrashAt (a test hook)
	log     *slog.Logger
	// shutdown asks Main to exit once the current response is written
	// (SendCtrlAltDel).
	shutdown func()
	// confine, if set, holds the directory every snapshot, mem-file and
	// memory-backend path must lie in (Config.ConfinePaths), as given and
	// with symlinks resolved (relative paths resolve against the real
	// working directory); set once before serving.
	confine []string

	mu sync.Mutex // guards every field below; held for a whole API action
	st runState
	// configured: a boot-specific resource was set, so /snapshot/load is
	// refused (it is allowed only on a fresh process).
	configured bool
	machine    machineConfig
	boot       *bootSource
	guest      guestArgs
	drives     []drive
	ifaces     []netIface
	// taps[i] is the open TAP of ifaces[i], held until the process exits.
	taps []*guestnet.TAP
	// ipcfg is the boot args' ip= (boot only: a loaded guest's address is
	// in its memory).
	ipcfg *guestnet.IPConfig
	// guestNet is the guest's network stack, built when the guest first
	// runs in this process; nil without network interfaces.
	guestNet       *guestnet.Guest
	guestNetFailed bool // a loaded guest's network could not be built: not retried
	vsock          *vsockDevice
	bootArgs       string // a restored VM's boot args (from its vmstate)
	// announce is the host vsock port the guest connects to once it runs
	// (forkd.vsock_announce), 0 for none or once done: once per boot and
	// once per restore.
	announce uint64
	mem      *guestMemory
	uffd     *uffd.FD      // Uffd load: Firecracker keeps its copy of the uffd
	uffdConn *net.UnixConn // and never closes the handshake socket (FC ≥ 1.12)
	restored bool          // the VM came from a snapshot (boot-source is empty in /vm/config)

	// wl is the guest workload, read without mu by GET /guest.
	wl atomic.Pointer[workload]
}

func newVMM(id string, rel release, snap snapshotVersion, log *slog.Logger, shutdown func()) *vmm {
	return &vmm{id: id, version: rel.String() + "-forkd+" + version.Version, rel: rel, snap: snap,
		log: log, shutdown: shutdown, machine: defaultMachineConfig()}
}

// usable refuses every action after a failed load.
func (v *vmm) usable() error {
	if v.st == stateFailed {
		return errUnusable
	}
	return nil
}

// preBoot is the check of every pre-boot-only call.
func (v *vmm) preBoot() error {
	if err := v.usable(); err != nil {
		return err
	}
	if v.st != stateNotStarted {
		return errPostBoot
	}
	return nil
}

// postBoot is the check of every post-boot-only call.
func (v *vmm) postBoot() error {
	if err := v.usable(); err != nil {
		return err
	}
	if v.st == stateNotStarted {
		return errPreBoot
	}
	return nil
}

func (v *vmm) setMachineConfig(u machineConfigUpdate, put bool) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.preBoot(); err != nil {
		return err
	}
	base := v.machine
	if put {
		if u.VCPUCount == nil {
			return fault("missing field `vcpu_count`")
		}
		if u.MemSizeMib == nil {
			return fault("missing field `mem_size_mib`")
		}
		base = defaultMachineConfig()
	}
	c, err := u.apply(base)
	if err != nil {
		return err
	}
	if err := v.checkMachineAgainstBoot(c); err != nil {
		return err
	}
	v.machine, v.configured = c, true
	return nil
}

func (v *vmm) setBootSource(b bootSource) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.preBoot(); err != nil {
		return err
	}
	if err := v.checkInitrdAgainstMachine(b); err != nil {
		return err
	}
	// The kernel is never executed, but it must exist, as Firecracker
	// refuses a missing one.
	if _, err := os.Stat(b.KernelImagePath); err != nil {
		return faultf("The kernel file cannot be opened: %v", err)
	}
	if b.InitrdPath != "" {
		if _, err := os.Stat(b.InitrdPath); err != nil {
			return faultf("The initrd file cannot be opened due to invalid path or invalid permissions. %v", err)
		}
	}
	g, err := parseBootArgs(b.BootArgs)
	if err != nil {
		return fault(err.Error())
	}
	if err := v.checkBalloonAgainstMachine(g); err != nil {
		return err
	}
	ip, err := guestnet.ParseIPArg(b.BootArgs)
	if err != nil {
		return fault(err.Error())
	}
	v.boot, v.guest, v.ipcfg, v.configured = &b, g, ip, true
	return nil
}

func (v *vmm) putDrive(d drive) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.preBoot(); err != nil {
		return err
	}
	if d.Socket == "" {
		if d.PathOnHost == "" {
			return faultf("Unable to create the block device: drive %s has no path_on_host", d.DriveID)
		}
		if _, err := os.Stat(d.PathOnHost); err != nil {
			return faultf("Unable to create the block device: BackingFile(Os { %v }, %q)", err, d.PathOnHost)
		}
	}
	switch d.CacheType {
	case "", "Unsafe", "Writeback":
	default:
		return faultf("unknown variant `%s`, expected `Unsafe` or `Writeback`", d.CacheType)
	}
	switch d.IOEngine {
	case "", "Sync", "Async":
	default:
		return faultf("unknown variant `%s`, expected `Sync` or `Async`", d.IOEngine)
	}
	for i, old := range v.drives {
		if d.IsRootDevice && old.IsRootDevice && old.DriveID != d.DriveID {
			return fault("A root block device already exists!")
		}
		if old.DriveID == d.DriveID {
			v.drives[i], v.configured = d, true
			return nil
		}
	}
	v.drives, v.configured = append(v.drives, d), true
	return nil
}

// patchDrive is the post-boot drive update (a new backing file).
func (v *vmm) patchDrive(id, path string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.postBoot(); err != nil {
		return err
	}
	for i := range v.drives {
		if v.drives[i].DriveID == id {
			if path != "" {
				if _, err := os.Stat(path); err != nil {
					return faultf("Unable to patch the block device: %v", err)
				}
				v.drives[i].PathOnHost = path
			}
			return nil
		}
	}
	return faultf("Invalid block device ID: %s", id)
}

func newLineage() uint64 {
	var b [8]byte
	rand.Read(b[:]) // never fails (crypto/rand panics internally instead)
	return binary.LittleEndian.Uint64(b[:]) | 1
}

// start is InstanceStart: map anonymous RAM, "boot" the guest (initialise
// the workload's memory) and run it.
func (v *vmm) start() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.preBoot(); err != nil {
		return err
	}
	if v.boot == nil {
		return errNoKernel
	}
	id, err := bootIdentity(v.ifaces, v.ipcfg)
	if err != nil {
		return err
	}
	memBytes := uint64(v.machine.MemSizeMib) << 20
	cfg, split := workloadFor(v.guest, v.machine.VCPUCount, memBytes)
	regions := layoutRegions(memBytes, split)
	if v.machine.huge() {
		if err := checkHugeLayout(regions); err != nil {
			return faultf("Cannot start microvm: %v", err)
		}
	}
	mem, err := mapAnonymous(regions, v.machine.huge())
	if err != nil {
		return faultf("Cannot start microvm: %v", err)
	}
	// A hugetlbfs pool too small for the guest fails here, not as a SIGBUS
	// in the middle of the guest's run.
	if err := mem.claimHugePages(); err != nil {
		mem.close()
		return faultf("Cannot start microvm: %v", err)
	}
	var dirty *dirtyBitmap
	if v.machine.TrackDirtyPages {
		dirty = newDirtyBitmap(mem.pages())
	}
	lineage := newLineage()
	if err := writeDiskRecord(v.drives, v.guest, lineage); err != nil {
		mem.close()
		return faultf("Cannot start microvm: %v", err)
	}
	wl := newBootWorkload(mem, cfg, lineage, dirty, v.log)
	// The guest's "kernel" brings its network up from the boot args and the
	// devices, and keeps what it decided in its memory.
	id.write(mem.page(0))
	wl.markDirty(0)
	if err := v.startGuestNet(id); err != nil {
		mem.close()
		return faultf("Cannot start microvm: guest network: %v", err)
	}
	v.mem = mem
	v.wl.Store(wl)
	v.announce = v.guest.vsockAnnounce
	v.runGuest(wl)
	v.st = stateRunning
	v.log.Info("microVM started", "vcpus", cfg.VCPUs, "mem_mib", v.machine.MemSizeMib, "huge_pages", v.machine.HugePages, "regions", len(mem.regions),
		"ws_pages", cfg.WSPages, "write_pct", cfg.WritePct, "rate", cfg.Rate, "discard_pct", cfg.DiscardPct)
	return nil
}

// setVMState is PATCH /vm: Paused stops every vCPU at a step boundary,
// Resumed restarts them. Both are idempotent, as in Firecracker.
func (v *vmm) setVMState(state string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.usable(); err != nil {
		return err
	}
	if v.st == stateNotStarted {
		return errPreBoot
	}
	switch state {
	case "Paused":
		v.pauseGuest()
		v.st = statePaused
	case "Resumed":
		if err := v.resumeGuest(); err != nil {
			return faultf("Failed to resume microVM: %v", err)
		}
		v.st = stateRunning
	default:
		return faultf("unknown variant `%s`, expected `Paused` or `Resumed`", state)
	}
	v.log.Info("vm state", "state", v.st.String())
	return nil
}

// ctrlAltDel stops the guest; the caller then ends the process, as a
// Firecracker whose guest reboots exits.
func (v *vmm) ctrlAltDel() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.usable(); err != nil {
		return err
	}
	if v.st == stateNotStarted {
		return errPreBoot
	}
	v.pauseGuest()
	v.log.Info("SendCtrlAltDel: guest stopped, exiting")
	v.shutdown()
	return nil
}

// pauseGuest freezes the guest: its network first (no frame is read or
// sent once it returns), then its vCPUs. The caller holds v.mu.
func (v *vmm) pauseGuest() {
	if v.guestNet != nil {
		v.guestNet.Stop()
	}
	if v.vsock != nil {
		v.vsock.stop()
	}
	if wl := v.wl.Load(); wl != nil {
		wl.stop()
	}
}

// resumeGuest runs the guest: vCPUs, then network. The first run of a
// loaded guest builds its network stack from the identity in its memory,
// so when the call that resumed it returns the stack is on its TAPs and
// listening. The caller holds v.mu.
func (v *vmm) resumeGuest() error {
	if v.guestNet == nil && len(v.taps) > 0 && !v.guestNetFailed {
		id, err := readIdentity(v.mem.page(0))
		if err == nil {
			err = v.startGuestNet(id)
		}
		if err != nil {
			// Like a guest whose kernel found no usable network: it runs
			// without one. Said once, in the log.
			v.guestNetFailed = true
			v.log.Error("guest network not started: the guest runs without network", "error", err)
		}
	}
	v.runGuest(v.wl.Load())
	return nil
}

// runGuest starts the vCPUs, then the devices: network, vsock (and the
// guest's announcement on vsock, the first time it runs after a boot or a
// load). The caller holds v.mu.
func (v *vmm) runGuest(wl *workload) {
	wl.start()
	if v.guestNet != nil {
		v.guestNet.Run()
	}
	if v.vsock != nil {
		v.vsock.run()
		if v.announce != 0 {
			v.vsock.announce(v.announce)
			v.announce = 0
		}
	}
}

// stopGuest stops the guest and closes its devices (process exit).
func (v *vmm) stopGuest() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.pauseGuest()
	if v.guestNet != nil {
		v.guestNet.Close()
	}
	closeTAPs(v.taps)
	if v.vsock != nil {
		v.vsock.close()
	}
}

// putVsock is PUT /vsock (pre-boot): the device's socket is bound now; one
// configured before is replaced and its socket removed, as in Firecracker.
func (v *vmm) putVsock(cfg vsockConfig) error {
	if err := v.confined("uds_path", cfg.UDSPath); err != nil {
		return err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.preBoot(); err != nil {
		return err
	}
	if v.vsock != nil {
		if err := v.vsock.remove(); err != nil {
			return faultf("Vsock config error: Cannot create backend for vsock device: Error binding to the host-side Unix socket: %v", err)
		}
		v.vsock = nil
	}
	d, err := newVsockDevice(cfg, firstLocalPort, v.guestFacts, v.log)
	if err != nil {
		return faultf("Vsock config error: %v", err)
	}
	v.vsock, v.configured = d, true
	return nil
}

// guestFacts is the line the guest agent sends on vsock: GET /guest's JSON.
func (v *vmm) guestFacts() ([]byte, error) {
	st, err := v.guestStats()
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(st)
	return append(b, '\n'), err
}

// describe is GET /.
type instanceInfo struct {
	AppName    string `json:"app_name"`
	ID         string `json:"id"`
	State      string `json:"state"`
	VMMVersion string `json:"vmm_version"`
}

func (v *vmm) describe() instanceInfo {
	v.mu.Lock()
	defer v.mu.Unlock()
	return instanceInfo{AppName: "Firecracker", ID: v.id, State: v.st.String(), VMMVersion: v.version}
}

func (v *vmm) machineConfig() machineConfig {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.machine
}

// vmConfig is GET /vm/config.
func (v *vmm) vmConfig() map[string]any {
	v.mu.Lock()
	defer v.mu.Unlock()
	cfg := map[string]any{
		"machine-config":     v.machine,
		"drives":             append([]drive{}, v.drives...),
		"network-interfaces": append([]netIface{}, v.ifaces...),
		"balloon":            nil,
		"logger":             nil,
		"metrics":            nil,
		"mmds-config":        nil,
		"vsock":              v.vsockConfig(),
		"entropy":            nil,
	}
	// After a restore the boot source is empty, as in Firecracker.
	if v.boot != nil && !v.restored {
		cfg["boot-source"] = v.boot
	} else {
		cfg["boot-source"] = map[string]any{}
	}
	return cfg
}

func (v *vmm) vsockConfig() any {
	if v.vsock == nil {
		return nil
	}
	return v.vsock.cfg
}

// guestStats is GET /guest; it takes no lock so it answers while a long
// action (a Full snapshot) runs.
func (v *vmm) guestStats() (GuestStats, error) {
	wl := v.wl.Load()
	if wl == nil {
		return GuestStats{}, errPreBoot
	}
	return wl.stats(), nil
}

// confined refuses a path the API names outside v.confine (relative paths
// resolve against the working directory, as the kernel would resolve them),
// or reached through a symlink below it: the API socket is root's, but a
// VMM forkd runs reads and writes forkd's own files, not any file a caller
// names.
func (v *vmm) confined(field, path string) error {
	if len(v.confine) == 0 {
		return nil
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return faultf("%s %q: %v", field, path, err)
	}
	var refusal error
	for _, root := range v.confine {
		err := hostpath.CheckBeneath(field, root, abs)
		if err == nil {
			return nil
		}
		if refusal == nil || !strings.Contains(err.Error(), "not inside") {
			refusal = err // the most telling reason (a symlink beats "not inside")
		}
	}
	return faultf("%v", refusal)
}

// setConfine sets the confinement root: dir as given and, if different,
// with its symlinks resolved (the working directory the kernel reports is
// the resolved one).
func (v *vmm) setConfine(dir string) {
	if dir == "" {
		return
	}
	v.confine = []string{dir}
	if real, err := filepath.EvalSymlinks(dir); err == nil && real != dir {
		v.confine = append(v.confine, real)
	}
}
