package doctor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/capacity"
	"github.com/forkd/forkd/internal/datadir"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/memfile"
	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/uffd"
)

// Status of one check.
const (
	OK      = "ok"      // present and usable
	Missing = "missing" // absent: forkd runs without it, degraded (Without says how)
	Fail    = "fail"    // forkd cannot run this way at all
)

// Result is one check.
type Result struct {
	Check   string `json:"check"`
	Status  string `json:"status"`
	Found   string `json:"found"`             // what is there (or what is wrong)
	Without string `json:"without,omitempty"` // what forkd does without it; "" when ok
}

// Paths are the host files the checks read; tests point them elsewhere.
type Paths struct {
	KVM, Tun, Userfaultfd, Mountinfo, Meminfo string
}

// HostPaths are the real ones.
func HostPaths() Paths {
	return Paths{KVM: "/dev/kvm", Tun: "/dev/net/tun", Userfaultfd: "/dev/userfaultfd",
		Mountinfo: "/proc/self/mountinfo", Meminfo: "/proc/meminfo"}
}

// Options say which host and configuration to check.
type Options struct {
	DataDir  string
	Capacity capacity.Limits
	Paths    Paths
	// LookPath finds a binary (default exec.LookPath; tests give none).
	LookPath func(string) (string, error)
	// Jail is how serve would confine VMMs with this configuration.
	Jail Jail
	// Root says whether the daemon would run as root (default: this
	// process's euid is 0).
	Root *bool
}

// Jail is the VMM confinement serve would use: the jailer command its
// vmm_jailer setting resolves to (empty with vmm_jailer none), or why it
// does not resolve.
type Jail struct {
	Setting string   // vmm_jailer as configured
	Cmd     []string // the resolved jailer (nil: none)
	Err     error    // the setting does not resolve (no jailer beside firecracker, ...)
}

// Run runs every check, in the order a user reads them.
func Run(ctx context.Context, o Options) []Result {
	if o.LookPath == nil {
		o.LookPath = exec.LookPath
	}
	if o.Paths == (Paths{}) {
		o.Paths = HostPaths()
	}
	root := os.Geteuid() == 0
	if o.Root != nil {
		root = *o.Root
	}
	cg := checkCgroups(o.Paths.Mountinfo, len(o.Jail.Cmd) > 0)
	kvm := checkKVM(o.Paths.KVM)
	fc := checkFirecracker(ctx, o.LookPath)
	if kvm.Status == OK && fc.Status == Fail {
		// vmm_binary auto would pick this firecracker and every launch
		// would be refused.
		fc.Without += "; with KVM here, vmm_binary auto picks it and every VM launch fails: install a supported release or set vmm_binary: emulator"
	} else if fc.Status == Fail {
		fc.Status = Missing // without KVM forkd never runs it
	}
	return []Result{
		kvm,
		fc,
		checkJail(ctx, o.Jail, root, cg),
		checkUffd(o.Paths.Userfaultfd),
		checkDataDir(o.DataDir),
		checkReflink(o.DataDir),
		checkTun(o.Paths.Tun),
		checkNftables(),
		cg,
		checkMemory(o.Paths.Meminfo, o.Capacity),
		checkHugePages(capacity.HugePagePool),
		checkDisk(o.DataDir),
	}
}

// Failed reports whether any check makes forkd unable to run.
func Failed(rs []Result) bool {
	for _, r := range rs {
		if r.Status == Fail {
			return true
		}
	}
	return false
}

func ok(check, found string) Result { return Result{Check: check, Status: OK, Found: found} }
func missing(check, found, without string) Result {
	return Result{Check: check, Status: Missing, Found: found, Without: without}
}

const (
	kvmGetAPIVersion = 0xAE00
	kvmCreateVM      = 0xAE01
)

func checkKVM(path string) Result {
	const without = "no KVM: VMs run on the built-in emulator (forkd vmm), not on Firecracker"
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return missing("kvm", fmt.Sprintf("%s: %v", path, errors.Unwrap(err)), without)
	}
	defer f.Close()
	v, err := unix.IoctlRetInt(int(f.Fd()), kvmGetAPIVersion)
	if err != nil || v != 12 {
		return missing("kvm", fmt.Sprintf("%s: KVM_GET_API_VERSION %d, %v (want 12)", path, v, err), without)
	}
	vm, err := unix.IoctlRetInt(int(f.Fd()), kvmCreateVM)
	if err != nil {
		return missing("kvm", fmt.Sprintf("%s opens, but KVM_CREATE_VM fails: %v (no hardware virtualisation?)", path, err), without)
	}
	unix.Close(vm)
	return ok("kvm", path+": API 12, can create VMs")
}

func checkBinary(ctx context.Context, lookPath func(string) (string, error), name, without string) Result {
	p, err := lookPath(name)
	if err != nil {
		return missing(name, "not in PATH", without)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, p, "--version").Output()
	if err != nil {
		return missing(name, fmt.Sprintf("%s --version: %v", p, err), without)
	}
	first, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return ok(name, p+": "+first)
}

// checkFirecracker is checkBinary for firecracker, with its release held to
// the range forkd drives (firecracker.CheckSupported): a release outside it
// is refused at every launch.
func checkFirecracker(ctx context.Context, lookPath func(string) (string, error)) Result {
	r := checkBinary(ctx, lookPath, "firecracker", "VMs run on the built-in emulator (forkd vmm): every memory mechanism is real, the guest is synthetic")
	if r.Status != OK {
		return r
	}
	// "Firecracker v1.12.1" (then build details on later lines).
	_, out, _ := strings.Cut(r.Found, ": ")
	fields := strings.Fields(out)
	if len(fields) < 2 {
		return Result{Check: r.Check, Status: Fail, Found: r.Found + " (no version in its output)", Without: "forkd cannot tell its release; every launch reads GET /version and refuses one it cannot drive"}
	}
	v, err := firecracker.ParseVersion(fields[1])
	if err == nil {
		err = firecracker.CheckSupported(v)
	}
	if err != nil {
		return Result{Check: r.Check, Status: Fail, Found: r.Found, Without: err.Error()}
	}
	r.Found += " (a release forkd drives)"
	return r
}

// checkJail says how VMMs would be confined. A jailed daemon needs root and
// the cpu, memory and pids controllers, or forkd serve refuses to start.
func checkJail(ctx context.Context, j Jail, root bool, cgroups Result) Result {
	const check = "jail"
	const unconfined = "VMMs run as root, unconfined: a guest that escapes into its VMM owns the host (development only)"
	switch {
	case j.Err != nil:
		return Result{Check: check, Status: Fail, Found: j.Err.Error(), Without: "forkd serve refuses to start"}
	case len(j.Cmd) == 0:
		return missing(check, "vmm_jailer none", unconfined)
	case !root:
		return Result{Check: check, Status: Fail, Found: "not root: a jailer needs root to chroot, make cgroups and drop to a VM's uid",
			Without: "forkd serve refuses to start with vmm_jailer " + j.Setting + "; run it as root, or set vmm_jailer none (" + unconfined + ")"}
	case cgroups.Status != OK:
		return Result{Check: check, Status: Fail, Found: "the jailer needs the cpu, memory and pids controllers: " + cgroups.Found,
			Without: "forkd serve refuses to start with vmm_jailer " + j.Setting + "; mount them, or set vmm_jailer none (" + unconfined + ")"}
	}
	found := strings.Join(j.Cmd, " ")
	if len(j.Cmd) == 1 { // a jailer binary (Firecracker's): say which release
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if out, err := exec.CommandContext(ctx, j.Cmd[0], "--version").Output(); err == nil {
			first, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
			found += ": " + first
		}
	}
	return ok(check, found+"; each VMM runs chrooted in its guest dir under its own uid, cgroups and seccomp filter")
}

// checkHugePages reports the host's pool of 2 MiB pages, which VMs created
// with huge_pages 2M draw their memory from.
func checkHugePages(pool func() (total, free int64, err error)) Result {
	const without = "VMs with huge_pages 2M are refused (409 insufficient_resources); set vm.nr_hugepages (sysctl -w vm.nr_hugepages=N) to offer them"
	total, free, err := pool()
	switch {
	case err != nil:
		return missing("huge pages", err.Error(), without)
	case total == 0:
		return missing("huge pages", "the pool of 2 MiB pages is empty (vm.nr_hugepages 0)", without)
	}
	return ok("huge pages", fmt.Sprintf("a pool of %d pages of 2 MiB (%d MiB), %d free: VMs with huge_pages 2M take theirs from it", total, total*2, free))
}

func checkUffd(dev string) Result {
	const without = "Uffd restores fail (restore_backend file, the default, works without the pager)"
	fd, err := uffd.Open(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		return missing("userfaultfd", "the userfaultfd syscall: "+err.Error()+" (as root it needs no device; otherwise vm.unprivileged_userfaultfd or "+dev+")", without)
	}
	fd.Close()
	found := "the userfaultfd syscall works"
	if _, err := os.Stat(dev); err == nil {
		found += "; " + dev + " exists (jailed, unprivileged VMMs need it: Linux >= 6.1)"
	} else {
		found += "; no " + dev + " (jailed, unprivileged VMMs would need it: Linux >= 6.1)"
	}
	return ok("userfaultfd", found)
}

// existing is dir, or the nearest directory above it that exists.
func existing(dir string) string {
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		if _, err := os.Stat(d); err == nil || d == "/" || d == "." {
			return d
		}
	}
}

func checkDataDir(dir string) Result {
	if err := datadir.CheckAncestors(existing(dir)); err != nil {
		return Result{Check: "data dir", Status: Fail, Found: err.Error(), Without: "forkd serve refuses to start"}
	}
	if _, err := os.Stat(dir); err != nil {
		return ok("data dir", dir+" does not exist yet; forkd serve makes it (0700); its parents are safe")
	}
	if err := datadir.Check(dir); err != nil {
		return Result{Check: "data dir", Status: Fail, Found: err.Error(), Without: "forkd serve refuses to start"}
	}
	return ok("data dir", dir+": owned by this uid, writable by no one else, and so are its parents")
}

func checkReflink(dir string) Result {
	const check = "reflink"
	d := existing(dir)
	fs := memfile.FilesystemName(d)
	can, err := memfile.CanReflink(d)
	if err != nil {
		return missing(check, err.Error(), "cannot tell; see below")
	}
	if !can {
		return missing(check, fmt.Sprintf("%s (%s) cannot reflink", d, fs),
			"a fork's first standby copies its whole RAM (the unshare guard's private copy) instead of sharing extents, and disk clones are copies; use XFS (mkfs.xfs -m reflink=1) or btrfs for the data dir")
	}
	return ok(check, fmt.Sprintf("%s (%s) can reflink: unshares and clones share extents", d, fs))
}

func checkTun(path string) Result {
	const without = "VMs get no network (each VM's TAP needs it)"
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return missing("tun", fmt.Sprintf("%s: %v", path, errors.Unwrap(err)), without)
	}
	f.Close()
	found := path + " opens"
	if initial, err := network.InInitialNamespace(); err == nil && initial {
		// The daemon refuses to network VMs from here unless told to.
		found += "; this is the host's own network namespace: a daemon here networks VMs only with network_root_namespace: true"
	}
	return ok("tun", found)
}

func checkNftables() Result {
	const without = "VMs get no network (per-VM NAT and isolation rules need nf_tables)"
	c, err := nftables.New()
	if err != nil {
		return missing("nf_tables", err.Error(), without)
	}
	defer c.CloseLasting()
	tables, err := c.ListTables()
	if err != nil {
		return missing("nf_tables", "listing tables: "+err.Error(), without)
	}
	return ok("nf_tables", fmt.Sprintf("available (%d tables in this namespace)", len(tables)))
}

// checkCgroups finds memory, cpu and pids in the v2 hierarchy or as v1
// controllers, where the jail finds them: hosts like this project's run a
// hybrid layout (v1 memory, cpu, pids; a v2 hierarchy holding only
// hugetlb).
func checkCgroups(mountinfo string, jailed bool) Result {
	without := "a VMM's memory, CPU and processes cannot be capped by cgroups"
	if jailed {
		without = "jailed VMMs cannot be given their cgroups: forkd serve refuses to start (see jail)"
	}
	m, err := jail.ReadMounts(mountinfo)
	if err != nil {
		return missing("cgroups", err.Error(), without)
	}
	var have, lack []string
	for _, c := range []string{"memory", "cpu", "pids"} {
		if v, dir := m.Where(c); v != 0 {
			have = append(have, fmt.Sprintf("%s (v%d at %s)", c, v, dir))
		} else {
			lack = append(lack, c)
		}
	}
	if len(lack) > 0 {
		return missing("cgroups", fmt.Sprintf("have %s; no %s", strings.Join(have, ", "), strings.Join(lack, ", ")), without)
	}
	// A jail takes all its controllers from one cgroup version: each
	// present in some version is not enough (memory and cpu in v2, pids
	// only in v1, say), as serve would refuse to start jailed.
	if _, err := m.Version(jail.Controllers...); err != nil {
		return missing("cgroups", fmt.Sprintf("have %s, but no one cgroup version offers them all: %v", strings.Join(have, ", "), err), without)
	}
	return ok("cgroups", strings.Join(have, ", "))
}

func meminfo(path string) (map[string]int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		var n int64
		if _, err := fmt.Sscanf(strings.TrimSpace(v), "%d", &n); err == nil {
			out[k] = n << 10
		}
	}
	return out, nil
}

func checkMemory(path string, l capacity.Limits) Result {
	mi, err := meminfo(path)
	if err != nil || mi["MemTotal"] == 0 {
		return Result{Check: "memory", Status: Fail, Found: fmt.Sprintf("%s: no MemTotal (%v)", path, err), Without: "the capacity check cannot size VMs: forkd serve refuses every VM"}
	}
	ratio, over := l.MaxVMMemoryRatio, l.MemoryOvercommit
	if ratio == 0 {
		ratio = capacity.DefaultMaxVMMemoryRatio
	}
	if over == 0 {
		over = capacity.DefaultMemoryOvercommit
	}
	perVM := int64(float64(mi["MemTotal"])*ratio) >> 20
	if l.MaxMemoryMiB > 0 && int64(l.MaxMemoryMiB) < perVM {
		perVM = int64(l.MaxMemoryMiB)
	}
	return ok("memory", fmt.Sprintf("MemTotal %d MiB, MemAvailable %d MiB: one VM up to %d MiB, running VMs up to %d MiB of guest RAM together (memory_overcommit %g)",
		mi["MemTotal"]>>20, mi["MemAvailable"]>>20, perVM, int64(float64(mi["MemTotal"])*over)>>20, over))
}

func checkDisk(dir string) Result {
	d := existing(dir)
	var st unix.Statfs_t
	if err := unix.Statfs(d, &st); err != nil {
		return Result{Check: "disk", Status: Fail, Found: err.Error(), Without: "forkd cannot tell what fits"}
	}
	free := int64(st.Bavail) * st.Bsize
	found := fmt.Sprintf("%d MiB free of %d MiB on %s", free>>20, int64(st.Blocks)*st.Bsize>>20, d)
	if free <= capacity.DiskReserve {
		return Result{Check: "disk", Status: Fail, Found: found, Without: fmt.Sprintf("every VM is refused: the capacity check keeps %d MiB free", capacity.DiskReserve>>20)}
	}
	return ok("disk", found)
}

// Render writes rs as a table for people: one line per check, then what
// forkd does without each missing thing.
func Render(w io.Writer, rs []Result) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CHECK\tSTATUS\tFOUND")
	for _, r := range rs {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", r.Check, r.Status, r.Found)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	first := true
	for _, r := range rs {
		if r.Without == "" {
			continue
		}
		if first {
			fmt.Fprintln(w, "\nWithout what is missing:")
			first = false
		}
		fmt.Fprintf(w, "  %s: %s\n", r.Check, r.Without)
	}
	return nil
}
