package bench

import (
	"context"
	"errors"
	"fmt"
	"github.com/forkd/forkd/internal/capacity"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/memfile"
	"github.com/forkd/forkd/internal/pager"
)

// Target is where the benchmark finds daemons to measure.
type Target struct {
	// Dir is on the filesystem the daemons' data dirs live on: its device
	// is the one whose reads and allocation are measured.
	Dir string
	// VMM names the VMM binary the daemons run, for the report.
	VMM string
	// Connect returns a daemon configured as v asks. It returns an error
	// wrapping ErrStrategyUnsupported when no daemon can fork with
	// v.Strategy; those cells are reported as skipped.
	Connect func(ctx context.Context, v Variant) (Conn, error)
}

// Variant is how a daemon under test is configured.
type Variant struct {
	Strategy string // fork strategy (hardlink: forkd's own)
	Prefetch string // the daemon's prefetch setting: off or auto
	// Args are further `forkd serve` flags (the differing-workload case
	// bounds the recording).
	Args []string
}

func (v Variant) String() string { return v.Strategy + ", prefetch " + v.Prefetch }

// Conn is one daemon under test.
type Conn struct {
	Service api.Service
	// DataDir is the daemon's data dir: the benchmark reads its fork VMMs'
	// sockets there to follow their workloads.
	DataDir string
	// Close releases the daemon (nil: nothing to release).
	Close func(context.Context) error
	// Pid is the daemon's process id, whose CPU the benchmark counts (0:
	// unknown, e.g. a daemon it did not start).
	Pid int
}

// runner is the state of one Run.
type runner struct {
	cfg      Config
	target   Target
	disk     Disk
	progress func(string)
	seq      int    // makes every name this run creates unique
	tag      string // run-unique name prefix
	serial   []SerialFork
}

// Run runs the fork-burst benchmark: for each size and strategy it creates
// a source VM, then for each backend and temperature forks cfg.Forks VMs
// concurrently from a snapshot of it. progress receives one line per step
// (nil: none). A cell that fails is reported with its errors and the run
// goes on; an error is returned only when the run cannot continue, along
// with the report of what was measured so far.
func Run(ctx context.Context, cfg Config, target Target, progress func(string)) (*Report, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if err := cfg.enoughHugePages(capacity.HugePagePool); err != nil {
		return nil, err
	}
	if cfg.DropCaches && os.Geteuid() != 0 {
		return nil, fmt.Errorf("fork-burst: dropping the page cache for cold bursts needs root (run as root or without drop-caches)")
	}
	disk, err := DiskOf(target.Dir)
	if err != nil {
		return nil, fmt.Errorf("fork-burst: %w", err)
	}
	if progress == nil {
		progress = func(string) {}
	}
	r := &runner{cfg: cfg, target: target, disk: disk, progress: progress,
		tag: fmt.Sprintf("fb%x", time.Now().UnixNano()&0xffffff)}
	rep := &Report{Machine: machine(disk, target.VMM), Config: cfg, Started: time.Now()}
	defer func() { rep.Duration = time.Since(rep.Started) }()

	defer func() { rep.Serial = r.serial }()
	for _, size := range cfg.SizesMiB {
		for _, strategy := range cfg.Strategies {
			cells, err := r.strategy(ctx, size, strategy)
			rep.Cells = append(rep.Cells, cells...)
			if err != nil {
				return rep, err
			}
		}
	}
	return rep, nil
}

// canReflink returns an error unless dir's filesystem accepts FICLONE: a
// daemon forced to reflink there would fail every fork.
func canReflink(dir string) error {
	ok, err := memfile.CanReflink(dir)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("the filesystem of %s cannot reflink (run on one that can: --fs xfs or btrfs)", dir)
	}
	return nil
}

// daemon is one daemon under test.
type daemon struct {
	svc    api.Service
	layout guestdir.Layout // its data dir: the benchmark reads its VMMs' sockets there
	v      Variant
	close  func(context.Context) error
	pid    int // 0: unknown
}

// dropCaches empties the host page cache for a cold burst, then reads
// the daemon's staged VMM program back in: cold means the snapshot's pages
// are on disk, not the VMM's code, which on a host serving VMs stays
// cached by the VMMs running it. Without this a cold burst's disk reads
// counted ~22 MiB of the VMM executable beside the working set.
func (d *daemon) dropCaches() error {
	if err := dropPageCache(); err != nil {
		return err
	}
	return warmVMMProgram(d.layout)
}

// dropPageCache is DropPageCache; the package's tests count the drops in
// its place instead of emptying the host's caches under other tests.
var dropPageCache = DropPageCache

// coldSerial reports whether the run times cold serial forks: it has cold
// bursts and drops the caches for them (serialForks).
func (c Config) coldSerial() bool { return c.DropCaches && slices.Contains(c.Temperatures, Cold) }

// warmVMMProgram reads data dir l's staged VMM program into the page cache.
func warmVMMProgram(l guestdir.Layout) error {
	f, err := os.Open(l.StagedExec())
	if errors.Is(err, fs.ErrNotExist) {
		return nil // no jail: the VMM runs the daemon's own, mapped, binary
	}
	if err != nil {
		return fmt.Errorf("warm the VMM program: %w", err)
	}
	defer f.Close()
	if _, err := io.Copy(io.Discard, f); err != nil {
		return fmt.Errorf("warm the VMM program: %w", err)
	}
	return nil
}

// connect starts (or finds) the daemon of variant v; a nil daemon and nil
// error mean the variant is unsupported (skip is the reason).
func (r *runner) connect(ctx context.Context, size int, v Variant) (d *daemon, skip string, err error) {
	conn, err := r.target.Connect(ctx, v)
	if errors.Is(err, ErrStrategyUnsupported) {
		r.progress(fmt.Sprintf("%d MiB %s: skipped: %v", size, v, err))
		return nil, err.Error(), nil
	}
	if err != nil {
		return nil, "", fmt.Errorf("fork-burst %d MiB %s: connect: %w", size, v, err)
	}
	layout, err := guestdir.New(conn.DataDir)
	if err != nil {
		if conn.Close != nil {
			conn.Close(context.WithoutCancel(ctx))
		}
		return nil, "", fmt.Errorf("fork-burst %d MiB %s: data dir: %w", size, v, err)
	}
	return &daemon{svc: conn.Service, layout: layout, v: v, close: conn.Close, pid: conn.Pid}, "", nil
}

func (r *runner) release(ctx context.Context, size int, d *daemon) {
	if d.close == nil {
		return
	}
	if err := d.close(context.WithoutCancel(ctx)); err != nil {
		r.progress(fmt.Sprintf("%d MiB %s: release daemon: %v", size, d.v, err))
	}
}

// cellKey names one cell.
type cellKey struct {
	size                    int
	strategy, prefetch      string
	rate, forks             int
	backend, temp, workload string
	run                     int // the differing-workload case's run, from 1
}

func (k cellKey) cell() Cell {
	return Cell{SizeMiB: k.size, Strategy: k.strategy, Prefetch: k.prefetch, Rate: k.rate, Forks: k.forks,
		Backend: k.backend, Temperature: k.temp, Workload: k.workload, Run: k.run}
}

// strategy runs every cell of one size and strategy: per prefetch setting a
// daemon, per rate a source VM, per burst size, backend and temperature a
// burst; then the differing-workload runs.
func (r *runner) strategy(ctx context.Context, size int, strategy string) ([]Cell, error) {
	var cells []Cell
	skipAll := func(prefetch string, reason string) {
		for _, rate := range r.cfg.Rates {
			for _, n := range r.cfg.Forks {
				for _, be := range r.cfg.Backends {
					for _, temp := range r.cfg.Temperatures {
						c := cellKey{size, strategy, prefetch, rate, n, be, temp, WorkloadSame, 0}.cell()
						c.Skipped = reason
						cells = append(cells, c)
					}
				}
			}
		}
	}
	if why := r.cfg.copySkipped(strategy, size); why != "" {
		r.progress(fmt.Sprintf("%d MiB %s: skipped: %s", size, strategy, why))
		for _, pf := range r.cfg.Prefetch {
			skipAll(pf, why)
		}
		return cells, nil
	}
	if strategy == StrategyReflink {
		if err := canReflink(r.target.Dir); err != nil {
			r.progress(fmt.Sprintf("%d MiB %s: skipped: %v", size, strategy, err))
			for _, pf := range r.cfg.Prefetch {
				skipAll(pf, err.Error())
			}
			return cells, nil
		}
	}
	// One daemon per prefetch setting, all up at once: their bursts take
	// turns, so "before" and "after" see the same machine.
	var ds []*daemon
	defer func() {
		for _, d := range ds {
			r.release(ctx, size, d)
		}
	}()
	for _, pf := range r.cfg.Prefetch {
		d, skip, err := r.connect(ctx, size, Variant{Strategy: strategy, Prefetch: pf})
		if err != nil {
			return cells, err
		}
		if d == nil {
			skipAll(pf, skip)
			continue
		}
		ds = append(ds, d)
	}
	if len(ds) > 0 {
		more, err := r.variants(ctx, ds, size)
		cells = append(cells, more...)
		if err != nil {
			return cells, err
		}
	}
	if r.cfg.DiffersRuns > 0 && strategy == StrategyHardlink {
		more, err := r.differs(ctx, size)
		cells = append(cells, more...)
		if err != nil {
			return cells, err
		}
	}
	return cells, nil
}

// variants runs the cells of the daemons ds (one per prefetch setting and
// build): per rate a source VM on each, then per burst size, round and
// backend each daemon's cold and warm bursts in turn. At the first rate every
// daemon also times serial forks, the daemons taking turns.
func (r *runner) variants(ctx context.Context, ds []*daemon, size int) ([]Cell, error) {
	var cells []Cell
	for ri, rate := range r.cfg.Rates {
		srcs := make([]*source, len(ds))
		// hsrcs are the sources backed by 2 MiB pages, for BackendUffdHuge.
		hsrcs := make([]*source, len(ds))
		cleanup := func() {
			for i := range ds {
				for _, src := range []*source{srcs[i], hsrcs[i]} {
					if src != nil {
						r.deleteInstance(ctx, ds[i], src.id)
					}
				}
			}
		}
		kinds := []bool{false} // per daemon: a source of 4 KiB pages, and one of 2 MiB pages for BackendUffdHuge
		if slices.ContainsFunc(r.cfg.Backends, hugeBackend) {
			kinds = append(kinds, true)
		}
		for i, d := range ds {
			for _, huge := range kinds {
				src, err := r.createSource(ctx, d, size, rate, r.cfg.bootArgs(size, rate), huge)
				if err != nil {
					for _, n := range r.cfg.Forks {
						for _, be := range r.cfg.Backends {
							for _, temp := range r.cfg.Temperatures {
								c := cellKey{size, d.v.Strategy, d.v.Prefetch, rate, n, be, temp, WorkloadSame, 0}.cell()
								c.Skipped = "source VM failed: " + err.Error()
								cells = append(cells, c)
							}
						}
					}
					cleanup()
					return cells, fmt.Errorf("fork-burst %d MiB %s: %w", size, d.v, err)
				}
				if huge {
					hsrcs[i] = src
				} else {
					srcs[i] = src
				}
			}
		}
		if ri == 0 && r.cfg.SerialForks > 0 {
			r.serial = append(r.serial, r.serialForks(ctx, ds, srcs, size)...)
		}
		for _, n := range r.cfg.Forks {
			for round := 1; round <= r.cfg.Rounds; round++ {
				for _, backend := range r.cfg.Backends {
					for i, d := range ds {
						key := cellKey{size, d.v.Strategy, d.v.Prefetch, rate, n, backend, "", WorkloadSame, r.cfg.roundOf(round)}
						src := srcs[i]
						if hugeBackend(backend) {
							src = hsrcs[i]
						}
						more, err := r.temperatures(ctx, d, src, key)
						cells = append(cells, more...)
						if err != nil {
							cleanup()
							return cells, err
						}
					}
				}
			}
		}
		cleanup()
	}
	return cells, nil
}

// temperatures runs the cold and warm bursts of one cell key: cold on a
// parent with a new cache key (recorded first when prefetch is on, so the
// burst replays) after the page cache is dropped; warm on the same parent
// again (after an unmeasured burst of one when there is no cold one).
func (r *runner) temperatures(ctx context.Context, d *daemon, src *source, key cellKey) ([]Cell, error) {
	var cells []Cell
	var par *parent
	defer func() {
		if par != nil {
			par.release(ctx, r, d)
		}
	}()
	for _, temp := range r.cfg.Temperatures {
		key.temp = temp
		if temp == Cold || par == nil {
			if par != nil {
				par.release(ctx, r, d)
				par = nil
			}
			p, err := r.freshParent(ctx, d, src)
			if err == nil {
				par = &p
				err = r.prepare(ctx, d, *par, key)
			}
			if err != nil {
				c := key.cell()
				c.Skipped = "preparing the fork parent failed: " + err.Error()
				cells = append(cells, c)
				continue
			}
		}
		if temp == Cold && r.cfg.DropCaches {
			if err := d.dropCaches(); err != nil {
				return cells, fmt.Errorf("fork-burst: %w", err)
			}
		}
		cells = append(cells, r.burst(ctx, d, *par, key))
		if ctx.Err() != nil {
			return cells, ctx.Err()
		}
	}
	return cells, nil
}

// prepare readies a fresh parent for the bursts of key: with prefetch on,
// one restore records the working set (and, Uffd, the pager is then drained,
// so a cold burst meets a pager that has none of the pages); for a warm
// burst with no cold one before it, an unmeasured burst of one warms the
// caches.
func (r *runner) prepare(ctx context.Context, d *daemon, par parent, key cellKey) error {
	if PrefetchSetting(d.v.Prefetch) == PrefetchAuto {
		if err := r.record(ctx, d, par, key); err != nil {
			return err
		}
	}
	if key.temp == Warm {
		prime := key
		prime.forks, prime.temp = 1, "prime"
		r.burst(ctx, d, par, prime)
	}
	return nil
}

// record makes the parent's working-set recording: one fork restored with
// the key's backend, followed until it read its working set and the daemon
// wrote the recording.
func (r *runner) record(ctx context.Context, d *daemon, par parent, key cellKey) error {
	r.progress(fmt.Sprintf("%d MiB %s %s: recording the working set of %s", key.size, d.v, key.backend, par))
	res := r.forkOne(ctx, d, par, r.name("record"))
	if res.err != nil {
		return fmt.Errorf("record: %w", res.err)
	}
	defer r.deleteInstance(ctx, d, res.id)
	r.restoreOne(ctx, d, &res, key.backend, key.size)
	if res.err != nil {
		return fmt.Errorf("record: %w", res.err)
	}
	p, err := r.waitPrefetch(ctx, d, res.id)
	if err != nil {
		return fmt.Errorf("record: %w", err)
	}
	if p == nil || p.Mode != "record" || p.PagesRecorded == 0 || p.Error != "" {
		return fmt.Errorf("record: the restore did not record a working set: %+v", p)
	}
	r.deleteInstance(ctx, d, res.id)
	if restoreBackend(key.backend) == api.BackendUffd {
		return r.drainPager(ctx, d)
	}
	return nil
}

// drainPager lets the daemon's pager exit (it has no session left) and
// waits until it has: the next Uffd restore starts a new one, whose cache
// holds nothing.
func (r *runner) drainPager(ctx context.Context, d *daemon) error {
	if err := drainPagers(ctx, d.layout.Root()); err != nil {
		return err
	}
	socks, _ := filepath.Glob(pager.ControlSocket(filepath.Join(d.layout.PagerRoot(), "*")))
	deadline := time.Now().Add(time.Minute)
	for _, sock := range socks {
		for {
			if _, err := os.Stat(sock); errors.Is(err, os.ErrNotExist) {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("pager %s did not exit after its drain", sock)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

// differs runs the case prefetch cannot help, DiffersRuns times: forks
// whose workload reads other pages than the recording holds
// (differsBootArgs), cold, at the largest burst and the last rate, with
// prefetch off and auto side by side in each run (two daemons, one
// source each; the recording is capped at the pages a fork reads).
func (r *runner) differs(ctx context.Context, size int) ([]Cell, error) {
	var cells []Cell
	rate, n := r.cfg.Rates[len(r.cfg.Rates)-1], r.cfg.maxForks()
	cap := fmt.Sprintf("%dMiB", r.cfg.workingSetMiB(size))
	var ds []*daemon
	var srcs []*source
	defer func() {
		for i, d := range ds {
			if i < len(srcs) {
				r.deleteInstance(ctx, d, srcs[i].id)
			}
			r.release(ctx, size, d)
		}
	}()
	for _, pf := range []string{PrefetchOff, PrefetchAuto} {
		d, skip, err := r.connect(ctx, size, Variant{Strategy: StrategyHardlink, Prefetch: pf, Args: []string{"--prefetch-max-bytes", cap}})
		if err != nil {
			return cells, err
		}
		if d == nil {
			return cells, fmt.Errorf("fork-burst: differing workload: %s", skip)
		}
		ds = append(ds, d)
		src, err := r.createSource(ctx, d, size, rate, r.cfg.differsBootArgs(size, rate), false)
		if err != nil {
			return cells, fmt.Errorf("fork-burst: differing workload: %w", err)
		}
		srcs = append(srcs, src)
	}
	for run := 1; run <= r.cfg.DiffersRuns; run++ {
		for _, backend := range r.cfg.Backends {
			if hugeBackend(backend) {
				continue // the case is measured on sources of 4 KiB pages
			}
			for i, d := range ds {
				key := cellKey{size, StrategyHardlink, d.v.Prefetch, rate, n, backend, Cold, WorkloadDiffers, run}
				par, err := r.freshParent(ctx, d, srcs[i])
				if err == nil {
					err = r.prepare(ctx, d, par, key)
				}
				if err != nil {
					c := key.cell()
					c.Skipped = "preparing the fork parent failed: " + err.Error()
					cells = append(cells, c)
					continue
				}
				if r.cfg.DropCaches {
					if err := d.dropCaches(); err != nil {
						return cells, fmt.Errorf("fork-burst: %w", err)
					}
				}
				cells = append(cells, r.burst(ctx, d, par, key))
				par.release(ctx, r, d)
				if ctx.Err() != nil {
					return cells, ctx.Err()
				}
			}
		}
	}
	return cells, nil
}

// settle makes durable what the run wrote before a timed phase (the
// source's standby: up to its whole RAM in dirty pages), with syncfs(2) of
// the measured filesystem, so that writeback does not land in the forks'
// fsyncs: serial forks and bursts measure the fork's own cost. It changes
// nothing a fork makes durable itself.
func (r *runner) settle() {
	f, err := os.Open(r.target.Dir)
	if err != nil {
		r.progress(fmt.Sprintf("settle: %v", err))
		return
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		r.progress(fmt.Sprintf("settle: syncfs %s: %v", r.target.Dir, err))
	}
}

// source is the VM every fork of one cell key descends from.
type source struct {
	id      string
	cycled  bool // has given a snapshot already: the next needs a new cache key
	sizeMiB int
	rate    int
}

// createSource boots the source VM (its memory backed by 2 MiB pages when
// huge), lets its workload write its working set, and stands it by.
func (r *runner) createSource(ctx context.Context, d *daemon, size, rate int, bootArgs string, huge bool) (*source, error) {
	req := api.CreateInstanceRequest{Name: r.name("src"), Vcpus: r.cfg.Vcpus, MemoryMiB: size, BootArgs: bootArgs}
	if huge {
		req.HugePages = api.HugePages2M
	}
	pages := req.WithDefaults().HugePages
	r.progress(fmt.Sprintf("%d MiB %s: booting the source VM (%s, huge_pages %s)", size, d.v, bootArgs, pages))
	inst, err := d.svc.CreateInstance(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("create source (huge_pages %s): %w", pages, err)
	}
	src := &source{id: inst.ID, sizeMiB: size, rate: rate}
	if _, err := r.waitWorkload(ctx, d, inst.ID, r.wsPages(size), rate); err != nil {
		r.deleteInstance(ctx, d, inst.ID)
		return nil, fmt.Errorf("source %s workload: %w", inst.ID, err)
	}
	if _, err := d.svc.Action(ctx, inst.ID, "standby", api.ActionRequest{}); err != nil {
		r.deleteInstance(ctx, d, inst.ID)
		return nil, fmt.Errorf("standby source %s: %w", inst.ID, err)
	}
	return src, nil
}

// parent is what one temperature's bursts fork from: a snapshot of the
// source, or the Standby source itself.
type parent struct {
	snapshot bool
	id       string
}

func (p parent) String() string {
	if p.snapshot {
		return "snapshot " + p.id
	}
	return "standby instance " + p.id
}

// fork forks the parent to Standby.
func (p parent) fork(ctx context.Context, svc api.Service, req api.ForkRequest) (api.Instance, error) {
	if p.snapshot {
		return svc.ForkSnapshot(ctx, p.id, req)
	}
	return svc.ForkInstance(ctx, p.id, req)
}

// release deletes a snapshot parent (the source outlives its parents).
func (p parent) release(ctx context.Context, r *runner, d *daemon) {
	if p.snapshot {
		r.deleteSnapshot(ctx, d, p.id)
	}
}

// freshParent gives the source's memory a new cache key, unless it has
// one nobody forked from yet (after the first parent, the source is
// restored, runs a little, and is stood by again), then snapshots it when
// forks are made from snapshots.
func (r *runner) freshParent(ctx context.Context, d *daemon, src *source) (parent, error) {
	if r.cfg.ForkFrom == FromStandby {
		if err := r.cycle(ctx, d, src); err != nil {
			return parent{}, err
		}
		return parent{id: src.id}, nil
	}
	snap, err := r.freshSnapshot(ctx, d, src)
	if err != nil {
		return parent{}, err
	}
	return parent{snapshot: true, id: snap.ID}, nil
}

// cycle restores and re-stands-by a source that already served as a
// parent, which gives its memory a new cache key.
func (r *runner) cycle(ctx context.Context, d *daemon, src *source) error {
	if src.cycled {
		if _, err := d.svc.Action(ctx, src.id, "restore", api.ActionRequest{}); err != nil {
			return fmt.Errorf("restore source %s: %w", src.id, err)
		}
		if _, err := r.waitWorkload(ctx, d, src.id, 100, src.rate); err != nil {
			return fmt.Errorf("source %s workload: %w", src.id, err)
		}
		if _, err := d.svc.Action(ctx, src.id, "standby", api.ActionRequest{}); err != nil {
			return fmt.Errorf("standby source %s: %w", src.id, err)
		}
	}
	src.cycled = true
	return nil
}

// freshSnapshot snapshots the source under a new cache key.
func (r *runner) freshSnapshot(ctx context.Context, d *daemon, src *source) (api.Snapshot, error) {
	if err := r.cycle(ctx, d, src); err != nil {
		return api.Snapshot{}, err
	}
	snap, err := d.svc.CreateSnapshot(ctx, src.id, api.SnapshotRequest{Name: r.name("snap")})
	if err != nil {
		return api.Snapshot{}, fmt.Errorf("snapshot source %s: %w", src.id, err)
	}
	return snap, nil
}

// name returns a run-unique instance or snapshot name.
func (r *runner) name(kind string) string {
	r.seq++
	return fmt.Sprintf("%s-%s-%d", r.tag, kind, r.seq)
}

// wsPages is the number of 4 KiB pages in a guest's working set.
func (r *runner) wsPages(sizeMiB int) uint64 {
	return uint64(r.cfg.workingSetMiB(sizeMiB)) << 20 / 4096
}

func (r *runner) deleteInstance(ctx context.Context, d *daemon, id string) {
	if err := d.svc.DeleteInstance(context.WithoutCancel(ctx), id); err != nil && !errors.Is(err, api.ErrNotFound) {
		r.progress(fmt.Sprintf("delete instance %s: %v", id, err))
	}
}

func (r *runner) deleteSnapshot(ctx context.Context, d *daemon, id string) {
	if err := d.svc.DeleteSnapshot(context.WithoutCancel(ctx), id); err != nil && !errors.Is(err, api.ErrNotFound) {
		r.progress(fmt.Sprintf("delete snapshot %s: %v", id, err))
	}
}

// machine describes this host for the report.
func machine(d Disk, vmm string) Machine {
	m := Machine{CPUs: runtime.NumCPU(), DataDir: d.Dir, FSType: d.FSType, Device: d.Device, VMM: vmm}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = strings.TrimRight(string(u.Release[:]), "\x00")
	}
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) == nil {
		m.MemBytes = int64(si.Totalram) * int64(si.Unit)
	}
	return m
}
