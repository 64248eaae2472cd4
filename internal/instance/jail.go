package instance

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/store"
)

// JailConfig says how the manager confines each VMM (the vmm_jailer,
// jail_uid_range and jail_memory_overhead settings).
type JailConfig struct {
	// Jailer is the jailer program followed by the arguments before its
	// own flags: {"/usr/local/bin/jailer"}, or {"/usr/bin/forkd", "jailer"}.
	// Empty runs every VMM unjailed, as root, with the whole host in view
	// (vmm_jailer none: development only).
	Jailer []string
	// UIDs is where each running VMM's uid (and gid) comes from.
	UIDs jail.UIDRange
	// MemoryOverhead is added to a VM's RAM for its cgroup's memory limit:
	// what the VMM itself may use.
	MemoryOverhead int64
	// CopyExec makes forkd jailer copy the exec file into each jail, as
	// the real jailer does, instead of hardlinking it: for the benchmark
	// that prices the two.
	CopyExec bool
}

// ResolveJailer turns the vmm_jailer setting into JailConfig.Jailer:
//   - "auto" (or ""): for the emulator, `<vmm binary> jailer` (forkd's own
//     jailer, in the same binary as the VMM); for Firecracker, the `jailer`
//     of the same release beside the firecracker binary;
//   - "none": nil (unjailed);
//   - a path: `forkd jailer` if its name starts with "forkd", else a
//     Firecracker jailer.
func ResolveJailer(setting string, vmm VMMSpec) ([]string, error) {
	switch setting {
	case "none":
		return nil, nil
	case "", "auto":
		if vmm.Emulator {
			return []string{vmm.Binary, "jailer"}, nil
		}
		j := filepath.Join(filepath.Dir(vmm.Binary), "jailer")
		if st, err := os.Stat(j); err != nil || !st.Mode().IsRegular() {
			return nil, fmt.Errorf("vmm_jailer auto: no jailer beside %s (want %s, from the same Firecracker release): install it there, set vmm_jailer to its path, or to none (development only: VMMs unconfined)", vmm.Binary, j)
		}
		return []string{j}, nil
	}
	path, err := exec.LookPath(setting)
	if err != nil {
		return nil, fmt.Errorf("vmm_jailer %q: %w", setting, err)
	}
	if strings.HasPrefix(filepath.Base(path), "forkd") {
		return []string{path, "jailer"}, nil
	}
	return []string{path}, nil
}

// jailPidsMax is a jailed VMM's pids.max: its threads. Firecracker runs a
// thread per vCPU and a few more; the emulator's Go runtime a thread per
// CPU plus one per blocking system call. Far below it, a runaway VMM
// cannot exhaust the host's.
const jailPidsMax = 1024

// jailNoFile is a jailed VMM's descriptor limit (the jailer's default).
const jailNoFile = 2048

// jailer is the manager's state for jailed launches (nil: unjailed).
type jailer struct {
	cmd      []string
	uids     *jail.UIDs
	overhead int64
	mounts   jail.Mounts
	version  int    // cgroup version holding cpu, memory and pids
	parent   string // forkd-<tag>: every VMM cgroup of this data dir lies below it
}

// newJailer checks that this host can jail VMMs and stages the VMM's exec
// file under its fixed name (<data>/exec/<exec>), where every jail takes it
// from.
func newJailer(cfg JailConfig, l guestdir.Layout, vmm VMMSpec) (*jailer, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("jailed VMMs need the daemon to run as root (a jailer mounts, pivot_roots, makes device nodes and changes uid); run as root, or set vmm_jailer none (development only: VMMs unconfined)")
	}
	if cfg.MemoryOverhead <= 0 {
		return nil, fmt.Errorf("jail_memory_overhead %d: must be more than 0", cfg.MemoryOverhead)
	}
	if cfg.UIDs.First == 0 {
		return nil, errors.New("jail_uid_range: unset")
	}
	mounts, err := jail.ReadMounts(jail.MountTable)
	if err != nil {
		return nil, err
	}
	version, err := mounts.Version(jail.Controllers...)
	if err != nil {
		return nil, fmt.Errorf("%w: a jailed VMM needs the cpu, memory and pids controllers (cgroup v2, or v1)", err)
	}
	if err := jail.StageExec(vmm.Binary, l.StagedExec()); err != nil {
		return nil, fmt.Errorf("stage the VMM for jails: %w", err)
	}
	return &jailer{
		cmd: slices.Clone(cfg.Jailer), uids: jail.NewUIDs(cfg.UIDs), overhead: cfg.MemoryOverhead,
		mounts: mounts, version: version, parent: jailParentCgroup(l),
	}, nil
}

// jailParentCgroup is the cgroup below which a data dir's VMMs get theirs.
func jailParentCgroup(l guestdir.Layout) string { return jail.DataDirParent(network.Tag(l.Root())) }

// RemoveJailCgroups removes every VMM cgroup of data dir l and its parent
// cgroups (jail.RemoveHostTree): for whoever tears a data dir down for
// good (a test's cleanup; daemonproc's Teardown does it for a daemon's).
func RemoveJailCgroups(ctx context.Context, l guestdir.Layout) error {
	return jail.RemoveHostTree(ctx, jailParentCgroup(l))
}

// close removes the data dir's
// parent cgroups (forkd-<tag>) if no VMM cgroup is left below them: VMMs
// that outlive the daemon keep theirs, and the next start's reconciler
// removes what their deaths leave.
func (j *jailer) close(log *slog.Logger) {
	if j == nil {
		return
	}
	if err := j.mounts.RemoveParent(j.version, j.parent, jail.Controllers); err != nil {
		log.Warn("remove the data dir's parent cgroups", "err", err)
	}
}

// emptyNetNS makes a VM without a network an empty network namespace of
// its own (only a loopback, down) and names it for the jailer through this
// process's descriptor, so no path on the host names it. Each VMM gets its
// own: two VMMs escaped from their guests share no loopback and no
// abstract socket. The namespace lives while the returned file is open or
// a process is in it: the caller closes the file once the launch is over,
// and the namespace goes with its VMM.
func emptyNetNS() (*os.File, string, error) {
	f, err := network.NewUnnamedNamespace()
	if err != nil {
		return nil, "", fmt.Errorf("the VMM's empty network namespace: %w", err)
	}
	return f, fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), f.Fd()), nil
}

// cgroup is instance id's VMM cgroup (as the jailer makes it).
func (j *jailer) cgroup(id string) (jail.Cgroup, error) {
	return j.mounts.Locate(j.version, j.parent, id, jail.Controllers)
}

// jailArgs prepares a jailed launch of in's VMM: a uid of its own, the
// jail root cleared of what the last VMM's jailer made, its disk and TAP
// given to that uid, and the jailer's command line (limits, network
// namespace) in spec. It returns what to undo if the launch fails.
// holder, when not nil, keeps the VMM's empty network namespace alive until
// the jailer has joined it: the caller closes it once the launch is over.
func (m *Manager) jailArgs(in store.Instance, g guestdir.Guest, spec *firecracker.LaunchSpec) (holder *os.File, err error) {
	j := m.jail
	uid, err := j.uids.Acquire(in.ID)
	if err != nil {
		return nil, fmt.Errorf("%w: %v: stop or stand by a VM, or widen jail_uid_range", api.ErrJailUIDsExhausted, err)
	}
	if err := clearJailerFiles(g); err != nil {
		return nil, err
	}
	disk, err := giveToVMM("disk", g, g.Rootfs(), uid, false)
	if err != nil {
		return nil, err
	}
	if m.cfg.DisableSealing {
		giveAllToVMM(g, uid) // the twin test's breach only
	}
	netns := m.netNS(in)
	if netns != "" {
		if err := m.net().SetTAPOwner(in.NetSlot, uid, uid); err != nil {
			return nil, err
		}
	} else if holder, netns, err = emptyNetNS(); err != nil {
		return nil, err
	}
	memBytes := int64(in.MemoryMiB) << 20
	args := jail.Args{
		ID: in.ID, ExecFile: m.layout.StagedExec(), UID: uid, GID: uid,
		ChrootBaseDir: m.layout.JailBase(), NetNS: netns, CgroupVersion: j.version,
		Cgroups:      jail.Settings(j.version, jail.Limits{VCPUs: in.Vcpus, MemoryBytes: memBytes + j.overhead, Pids: jailPidsMax}),
		ParentCgroup: j.parent,
		// The largest file a VMM writes is its disk or its mem-file.
		ResourceLimits: []string{
			jail.LimitFsize + "=" + strconv.FormatInt(max(memBytes, disk)+(64<<20), 10),
			jail.LimitNoFile + "=" + strconv.Itoa(jailNoFile),
		},
	}
	if root := args.ChrootDir(); root != g.Dir {
		closeHolder(holder)
		return nil, fmt.Errorf("jail root %s is not the guest dir %s", root, g.Dir)
	}
	spec.Jailer = append(slices.Clone(j.cmd), args.CommandLine()...)
	spec.JailRoot, spec.NetNS = g.Dir, ""
	spec.Args = m.cfg.VMM.jailedArgs()
	if m.cfg.Jail.CopyExec {
		spec.Env = append(spec.Env, jail.EnvCopyExec+"=1")
	}
	return holder, nil
}

// closeHolder closes an empty namespace's holder (nil: none).
func closeHolder(f *os.File) {
	if f != nil {
		f.Close()
	}
}

// jailedArgs are the VMM's own arguments when a jailer execs it: the
// emulator is exec'd as forkd-vmm (argv[0] dispatch), so without the
// "vmm" subcommand an unjailed launch needs.
func (s VMMSpec) jailedArgs() []string {
	if s.Emulator && len(s.Args) > 0 && s.Args[0] == "vmm" {
		return slices.Clone(s.Args[1:])
	}
	return slices.Clone(s.Args)
}

// releaseJail frees what a jailed VMM held once it is gone: its uid and
// its cgroup (after its memory controller's oom counter was read, if
// anyone needed it).
func (m *Manager) releaseJail(id string) {
	if m.jail == nil {
		return
	}
	m.jail.uids.Release(id)
	if cg, err := m.jail.cgroup(id); err == nil {
		if err := cg.Remove(); err != nil {
			m.log.Warn("remove a VMM's cgroup", "instance", id, "err", err)
		}
	}
}

// oomKills is how many processes the memory limit of instance id's VMM
// cgroup killed (0 when unjailed or unknown).
func (m *Manager) oomKills(id string) uint64 {
	if m.jail == nil {
		return 0
	}
	cg, err := m.jail.cgroup(id)
	if err != nil {
		return 0
	}
	n, _ := cg.OOMKills()
	return n
}

// exitCause names why a VMM ended when its jail knows (a seccomp kill, a
// memory-limit kill); "" otherwise. A VMM adopted after a restart has no
// known wait status, but its cgroup's oom counter still tells.
func (m *Manager) exitCause(id string, exit firecracker.Exit) string {
	oom := m.oomKills(id)
	if exit.Known {
		return jail.ExitCause(exit.Status, oom)
	}
	if oom > 0 {
		return jail.CauseMemoryLimit
	}
	return ""
}

// withDeathCause adds to err, an operation's failure while p was its VMM,
// why p died if its jail killed it (a VMM killed by its memory limit while
// it boots or loads a snapshot fails the call with an EOF from its API
// otherwise). Call it before the VMM's cgroup is removed.
func (m *Manager) withDeathCause(id string, p *firecracker.Process, err error) error {
	select {
	case <-p.Done():
	case <-time.After(100 * time.Millisecond): // the exit may trail the API's EOF
		return err
	}
	if cause := m.exitCause(id, p.Exit()); cause != "" {
		return fmt.Errorf("%w (the VMM was killed: %s)", err, cause)
	}
	return err
}

// claimJail records the uid of a VMM found running at start, so no new VMM
// is given it.
func (m *Manager) claimJail(id string, pid int) {
	if m.jail == nil {
		return
	}
	uid, err := procUID(pid)
	if err != nil || uid == 0 {
		return // unjailed (from before jails, or vmm_jailer none)
	}
	if err := m.jail.uids.Claim(id, uid); err != nil {
		m.log.Warn("reconcile: a running VMM's uid", "instance", id, "pid", pid, "err", err)
	}
}

// procUID is a process's real uid (/proc/<pid>/status).
func procUID(pid int) (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				return strconv.Atoi(f[0])
			}
		}
	}
	return 0, fmt.Errorf("/proc/%d/status has no Uid", pid)
}

// vmmUID is the uid instance id's running VMM runs as (0 unjailed).
func (m *Manager) vmmUID(id string) int {
	p := m.proc(id)
	if p == nil {
		return 0
	}
	uid, err := procUID(p.Pid)
	if err != nil {
		return 0
	}
	return uid
}

// removeOrphanCgroups removes every VMM cgroup of this data dir (below
// forkd-<tag>) whose VMM is gone: a crash between a VMM's exit and the
// removal of its cgroup leaves one. A cgroup that still holds a process is
// kept (rmdir refuses it).
func (m *Manager) removeOrphanCgroups() {
	if m.jail == nil {
		return
	}
	seen := map[string]bool{}
	for _, ctrl := range jail.Controllers {
		cg, err := m.jail.mounts.Locate(m.jail.version, m.jail.parent, "x", []string{ctrl})
		if err != nil {
			continue
		}
		parent := filepath.Dir(cg.Dirs[ctrl])
		ents, err := os.ReadDir(parent)
		if err != nil {
			continue // no VMM of this data dir was ever jailed here
		}
		for _, e := range ents {
			if e.IsDir() && guestdir.IsForkdID(e.Name()) {
				seen[e.Name()] = true
			}
		}
	}
	for id := range seen {
		if p := m.proc(id); p != nil && p.Alive() {
			continue
		}
		if cg, err := m.jail.cgroup(id); err == nil {
			if err := cg.Remove(); err != nil {
				m.log.Warn("reconcile: a VMM cgroup no running VMM holds", "instance", id, "err", err)
				continue
			}
			m.log.Info("reconcile: removed the cgroup of a VMM that is gone", "instance", id)
		}
	}
}

// clearJailerFiles removes what a jailer made in the jail root at the last
// launch (the device nodes, /run, the pid file; a jailer refuses a device
// node already there) before the next one. Names only: nothing here
// follows a link.
func clearJailerFiles(g guestdir.Guest) error {
	for _, p := range []string{g.DevDir(), g.RunDir(), g.PidFile()} {
		if err := os.RemoveAll(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("clear jail %s: %w", g.Dir, err)
		}
	}
	return nil
}

// sanitizeGuest runs once a guest's VMM is gone (killed, or found dead): it
// removes what the jailer made (device nodes, /run, the pid file, the exec
// file) and every entry forkd never makes in a guest dir (a symlink, socket,
// FIFO or device node, which a VMM could have left to redirect the daemon's
// later work there), so that path operations on the dir while no VMM runs
// meet only the regular files and directories forkd made. Through os.Root:
// no removal reaches outside the guest dir.
func sanitizeGuest(g guestdir.Guest) error {
	if err := clearJailerFiles(g); err != nil {
		return err
	}
	if err := os.Remove(g.ExecLink()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("clear jail %s: %w", g.Dir, err)
	}
	root, err := os.OpenRoot(g.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("sanitize %s: %w", g.Dir, err)
	}
	defer root.Close()
	var odd []string
	err = fs.WalkDir(root.FS(), ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil // gone meanwhile, or unreadable: not ours to judge
		}
		if t := d.Type(); !t.IsDir() && !t.IsRegular() {
			odd = append(odd, p)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("sanitize %s: %w", g.Dir, err)
	}
	var errs []error
	for _, p := range odd {
		if err := root.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("sanitize %s: %w", g.Dir, errors.Join(errs...))
	}
	return nil
}

// giveAllToVMM gives every regular file of g's guest dir to uid, writable:
// the breach Config.DisableSealing exists to show (test only).
func giveAllToVMM(g guestdir.Guest, uid int) {
	filepath.WalkDir(g.Dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && (d.Type().IsRegular() || d.IsDir()) {
			os.Lchown(p, uid, uid)
			if d.Type().IsRegular() {
				os.Chmod(p, 0o600)
			}
		}
		return nil
	})
}
