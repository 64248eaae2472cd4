package capacity

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// ErrInsufficient wraps every refusal.
var ErrInsufficient = errors.New("insufficient resources")

// Defaults of the limits (config keys of the same names).
const (
	DefaultMaxVMMemoryRatio = 1.0
	DefaultMemoryOvercommit = 8.0
	DefaultMaxRunningVMs    = 1024
	// DiskReserve stays free on the data dir's filesystem whatever is
	// admitted: the database, its WAL and the logs must still be writable.
	DiskReserve = 64 << 20
)

// Limits are the configured caps; zero values are "no cap" except where a
// default applies (New fills those).
type Limits struct {
	MaxVMMemoryRatio float64 // max_vm_memory_ratio: one VM's RAM ≤ MemTotal × this
	MaxMemoryMiB     int     // max_memory_mib: one VM's RAM cap (0: none)
	MaxVcpus         int     // max_vcpus: one VM's vCPU cap (0: none)
	MemoryOvercommit float64 // memory_overcommit: running VMs' RAM together ≤ MemTotal × this
	MaxRunningVMs    int     // max_running_vms: running VMs at once
}

// Host is what the ledger reads of the machine (tests give their own).
type Host struct {
	MemTotal func() (int64, error)            // bytes
	DiskFree func(path string) (int64, error) // bytes available to the daemon
	// HugePages is the host's pool of 2 MiB pages: how many, and how many
	// are free.
	HugePages func() (total, free int64, err error)
}

// RealHost reads /proc/meminfo, statfs and sysfs.
func RealHost() Host { return Host{MemTotal: memTotal, DiskFree: diskFree, HugePages: HugePagePool} }

// Request is one operation to admit.
type Request struct {
	// ID is the instance the operation acts on (or creates); its own
	// running record is not counted against it.
	ID        string
	MemoryMiB int
	Vcpus     int
	// Runs: the operation leaves the VM running (create with start, start,
	// restore, a fork brought to Running).
	Runs bool
	// DiskBytes is what the operation will write on the data dir's
	// filesystem (0: nothing to check).
	DiskBytes int64
	// HugePages: the VM's memory comes from the host's pool of 2 MiB pages.
	// Boots: the operation boots it (create with start, start), which
	// claims all of that memory at once; a restore claims only the pages
	// its guest touches.
	HugePages bool
	Boots     bool
}

// Running is one VM that holds its guest RAM (its VMM runs).
type Running struct {
	ID        string
	MemoryMiB int
}

// Ledger admits requests against Limits on a Host.
type Ledger struct {
	limits  Limits
	host    Host
	dataDir string

	mu       sync.Mutex
	reserved map[string]Request // admitted and not yet released; guarded by mu
}

// New returns an Ledger for the data dir at dataDir.
func New(l Limits, h Host, dataDir string) (*Ledger, error) {
	if l.MaxVMMemoryRatio == 0 {
		l.MaxVMMemoryRatio = DefaultMaxVMMemoryRatio
	}
	if l.MemoryOvercommit == 0 {
		l.MemoryOvercommit = DefaultMemoryOvercommit
	}
	if l.MaxRunningVMs == 0 {
		l.MaxRunningVMs = DefaultMaxRunningVMs
	}
	switch {
	case l.MaxVMMemoryRatio < 0, l.MemoryOvercommit < 0, l.MaxMemoryMiB < 0, l.MaxVcpus < 0, l.MaxRunningVMs < 0:
		return nil, fmt.Errorf("capacity: negative limit in %+v", l)
	}
	return &Ledger{limits: l, host: h, dataDir: dataDir, reserved: map[string]Request{}}, nil
}

// Limits are the effective limits (defaults filled in).
func (a *Ledger) Limits() Limits { return a.limits }

// Reserve checks req against the limits, the VMs that run now and what other
// admitted requests hold, and reserves it. running reads what runs from the
// records; it is called under the ledger's lock, so an operation that
// updated its record and then released its reservation is counted exactly
// once. The caller must call the returned release once the operation has
// ended (its record then shows what runs).
func (a *Ledger) Reserve(req Request, running func() ([]Running, error)) (release func(), err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var now []Running
	if req.Runs {
		if now, err = running(); err != nil {
			return nil, fmt.Errorf("capacity: %w", err)
		}
	}
	if err := a.check(req, now); err != nil {
		return nil, err
	}
	key := req.ID
	for n := 0; key == "" || a.reserved[key] != (Request{}); n++ {
		key = fmt.Sprintf("%s#%d", req.ID, n)
	}
	a.reserved[key] = req
	var once sync.Once
	return func() {
		once.Do(func() {
			a.mu.Lock()
			delete(a.reserved, key)
			a.mu.Unlock()
		})
	}, nil
}

func (a *Ledger) check(req Request, running []Running) error {
	l := a.limits
	mem := int64(req.MemoryMiB) << 20
	if l.MaxVcpus > 0 && req.Vcpus > l.MaxVcpus {
		return refuse("vcpus", "%d vCPUs exceed max_vcpus %d by %d", req.Vcpus, l.MaxVcpus, req.Vcpus-l.MaxVcpus)
	}
	if l.MaxMemoryMiB > 0 && req.MemoryMiB > l.MaxMemoryMiB {
		return refuse("memory", "%d MiB of guest RAM exceed max_memory_mib %d by %d MiB", req.MemoryMiB, l.MaxMemoryMiB, req.MemoryMiB-l.MaxMemoryMiB)
	}
	total, err := a.host.MemTotal()
	if err != nil {
		return fmt.Errorf("capacity: %w", err)
	}
	if perVM := int64(float64(total) * l.MaxVMMemoryRatio); mem > perVM {
		return refuse("memory", "%d MiB of guest RAM exceed this host's per-VM limit of %d MiB (MemTotal %d MiB × max_vm_memory_ratio %g) by %d MiB",
			req.MemoryMiB, perVM>>20, total>>20, l.MaxVMMemoryRatio, (mem-perVM+(1<<20)-1)>>20)
	}
	if req.Runs && req.HugePages {
		if err := a.checkHugePages(req); err != nil {
			return err
		}
	}
	if req.Runs {
		held := map[string]bool{}
		var sum int64
		n := 0
		for _, r := range a.reserved {
			// One VM runs once: a create or a fork admits it, then its
			// start or restore reserves it again; neither its own nor
			// another VM's two reservations count twice.
			if r.Runs && r.ID != req.ID && (r.ID == "" || !held[r.ID]) {
				sum += int64(r.MemoryMiB) << 20
				n++
				held[r.ID] = true
			}
		}
		for _, r := range running {
			if r.ID == req.ID || held[r.ID] {
				continue // itself, or counted as a reservation already
			}
			sum += int64(r.MemoryMiB) << 20
			n++
		}
		if n+1 > l.MaxRunningVMs {
			return refuse("running VMs", "%d VMs run or are starting, and max_running_vms is %d: 1 over", n, l.MaxRunningVMs)
		}
		if budget := int64(float64(total) * l.MemoryOvercommit); sum+mem > budget {
			return refuse("memory", "running VMs hold %d MiB of guest RAM; %d MiB more exceed MemTotal %d MiB × memory_overcommit %g = %d MiB by %d MiB",
				sum>>20, req.MemoryMiB, total>>20, l.MemoryOvercommit, budget>>20, (sum+mem-budget+(1<<20)-1)>>20)
		}
	}
	if req.DiskBytes > 0 {
		free, err := a.host.DiskFree(a.dataDir)
		if err != nil {
			return fmt.Errorf("capacity: %w", err)
		}
		var pending int64
		for _, r := range a.reserved {
			pending += r.DiskBytes
		}
		if need := req.DiskBytes + pending + DiskReserve; need > free {
			return refuse("disk", "the data dir's filesystem has %d MiB free; this needs %d MiB (+ %d MiB for operations in flight and a %d MiB reserve): %d MiB short",
				free>>20, (req.DiskBytes+(1<<20)-1)>>20, pending>>20, DiskReserve>>20, (need-free+(1<<20)-1)>>20)
		}
	}
	return nil
}

// checkHugePages admits a VM whose memory comes from the host's pool of
// 2 MiB pages. A guest that finds the pool empty dies (SIGBUS) or stalls
// (its pager's copies fail), so what is refused here is: a VM larger than
// the whole pool; a boot without all of its memory free, counting the
// boots admitted and in flight (a booted guest comes to use all of it, and
// forkd vmm claims it at boot); a restore with no page free. A restore
// takes pages as its guest touches them (Firecracker maps the memory
// MAP_NORESERVE), so the forks of one VM share the pool as they share
// RAM: each takes only the pages it touches.
func (a *Ledger) checkHugePages(req Request) error {
	if a.host.HugePages == nil {
		return fmt.Errorf("capacity: this host reports no pool of 2 MiB pages")
	}
	total, free, err := a.host.HugePages()
	if err != nil {
		return fmt.Errorf("capacity: %w", err)
	}
	const page = 2 << 20
	mem := int64(req.MemoryMiB) << 20
	switch {
	case total*page < mem:
		return refuse("huge pages", "%d MiB of guest RAM backed by 2 MiB pages exceed the host's whole pool of %d MiB (%d pages): raise vm.nr_hugepages to at least %d",
			req.MemoryMiB, total*page>>20, total, (mem+page-1)/page)
	case free == 0:
		return refuse("huge pages", "the host's pool of 2 MiB pages has none free (all %d in use): raise vm.nr_hugepages, or stop or stand by a VM backed by huge pages", total)
	case !req.Boots:
		return nil
	}
	var booting int64 // pages of boots admitted and in flight
	for _, r := range a.reserved {
		if r.Runs && r.HugePages && r.Boots && r.ID != req.ID {
			booting += (int64(r.MemoryMiB)<<20 + page - 1) / page
		}
	}
	if need := (mem+page-1)/page + booting; need > free {
		return refuse("huge pages", "booting %d MiB of guest RAM backed by 2 MiB pages takes %d pages, %d more are held for boots in flight, and the host's pool has %d free: %d short (raise vm.nr_hugepages)",
			req.MemoryMiB, (mem+page-1)/page, booting, free, need-free)
	}
	return nil
}

// Error is a refusal: which resource, and what is missing.
type Error struct {
	Resource string // "memory", "vcpus", "running VMs", "disk"
	Detail   string
}

func (e *Error) Error() string { return e.Resource + ": " + e.Detail }
func (e *Error) Unwrap() error { return ErrInsufficient }

func refuse(resource, format string, args ...any) error {
	return &Error{Resource: resource, Detail: fmt.Sprintf(format, args...)}
}

// memTotal is the host's RAM, /proc/meminfo's MemTotal, from sysinfo(2)
// (the same figure): one syscall, where reading /proc/meminfo opens, reads
// and parses a file at every reservation, under the ledger's lock.
func memTotal() (int64, error) {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 0, fmt.Errorf("sysinfo: %w", err)
	}
	return int64(si.Totalram) * int64(si.Unit), nil
}

// diskFree is the space available to unprivileged writers on path's
// filesystem (root may dig into the reserve; forkd does not count on it).
func diskFree(path string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", path, err)
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// hugePagesDir is where the kernel reports the pool of 2 MiB pages;
// NrHugePagesPath sizes it (vm.nr_hugepages).
const (
	hugePagesDir    = "/sys/kernel/mm/hugepages/hugepages-2048kB/"
	NrHugePagesPath = hugePagesDir + "nr_hugepages"
)

// HugePagePool reads the host's pool of 2 MiB pages: how many, and how
// many are free. A kernel without 2 MiB pages has a pool of none.
func HugePagePool() (total, free int64, err error) {
	read := func(path string) (int64, error) {
		b, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			return 0, nil
		}
		if err != nil {
			return 0, err
		}
		return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	}
	if total, err = read(NrHugePagesPath); err != nil {
		return 0, 0, fmt.Errorf("read the pool of 2 MiB pages: %w", err)
	}
	if free, err = read(hugePagesDir + "free_hugepages"); err != nil {
		return 0, 0, fmt.Errorf("read the pool of 2 MiB pages: %w", err)
	}
	return total, free, nil
}
