package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/memfile"
)

// Target is where the benchmark finds daemons to measure.
type Target struct {
	// Dir is on the filesystem the daemons' data dirs live on: its device
	// is the one whose reads and allocation are measured.
	Dir string
	// VMM names the VMM binary the daemons run, for the report.
	VMM string
	// Connect returns a daemon whose forks use strategy. It returns an
	// error wrapping ErrStrategyUnsupported when no daemon can fork that
	// way; those cells are reported as skipped.
	Connect func(ctx context.Context, strategy string) (Conn, error)
}

// Conn is one daemon under test.
type Conn struct {
	Service api.Service
	// DataDir is the daemon's data dir: the benchmark reads its fork VMMs'
	// sockets there to follow their workloads.
	DataDir string
	// Close releases the daemon (nil: nothing to release).
	Close func(context.Context) error
}

// runner is the state of one Run.
type runner struct {
	cfg      Config
	target   Target
	layout   guestdir.Layout // of the daemon of the strategy being measured
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
	probe, err := os.MkdirTemp(dir, "reflink-probe-")
	if err != nil {
		return fmt.Errorf("reflink probe: %w", err)
	}
	defer os.RemoveAll(probe)
	a := filepath.Join(probe, "a")
	if err := os.WriteFile(a, []byte("forkd"), 0o600); err != nil {
		return fmt.Errorf("reflink probe: %w", err)
	}
	mode, err := memfile.Clone(a, filepath.Join(probe, "b"))
	if err != nil {
		return fmt.Errorf("reflink probe: %w", err)
	}
	if mode != memfile.ModeReflink {
		return fmt.Errorf("the filesystem of %s cannot reflink (run on one that can: --fs xfs or btrfs)", dir)
	}
	return nil
}

// strategy runs every backend × temperature cell of one size and strategy
// against one source VM.
func (r *runner) strategy(ctx context.Context, size int, strategy string) ([]Cell, error) {
	skipAll := func(reason string) []Cell {
		var cells []Cell
		for _, be := range r.cfg.Backends {
			for _, temp := range r.cfg.Temperatures {
				cells = append(cells, Cell{SizeMiB: size, Strategy: strategy, Backend: be, Temperature: temp, Skipped: reason})
			}
		}
		return cells
	}
	if why := r.cfg.copySkipped(strategy, size); why != "" {
		r.progress(fmt.Sprintf("%d MiB %s: skipped: %s", size, strategy, why))
		return skipAll(why), nil
	}
	if strategy == StrategyReflink {
		if err := canReflink(r.target.Dir); err != nil {
			r.progress(fmt.Sprintf("%d MiB %s: skipped: %v", size, strategy, err))
			return skipAll(err.Error()), nil
		}
	}
	conn, err := r.target.Connect(ctx, strategy)
	if errors.Is(err, ErrStrategyUnsupported) {
		r.progress(fmt.Sprintf("%d MiB %s: skipped: %v", size, strategy, err))
		return skipAll(err.Error()), nil
	}
	if err != nil {
		return nil, fmt.Errorf("fork-burst %d MiB %s: connect: %w", size, strategy, err)
	}
	if conn.Close != nil {
		defer func() {
			if err := conn.Close(context.WithoutCancel(ctx)); err != nil {
				r.progress(fmt.Sprintf("%d MiB %s: release daemon: %v", size, strategy, err))
			}
		}()
	}
	svc := conn.Service
	if r.layout, err = guestdir.New(conn.DataDir); err != nil {
		return nil, fmt.Errorf("fork-burst %d MiB %s: data dir: %w", size, strategy, err)
	}

	src, err := r.createSource(ctx, svc, size, strategy)
	if err != nil {
		return skipAll("source VM failed: " + err.Error()), fmt.Errorf("fork-burst %d MiB %s: %w", size, strategy, err)
	}
	defer r.deleteInstance(ctx, svc, src.id)
	if r.cfg.SerialForks > 0 {
		r.serial = append(r.serial, r.serialForks(ctx, svc, src, size, strategy))
	}

	var cells []Cell
	for _, backend := range r.cfg.Backends {
		var par *parent
		for _, temp := range r.cfg.Temperatures {
			if temp == Cold || par == nil {
				if par != nil {
					par.release(ctx, r, svc)
				}
				p, err := r.freshParent(ctx, svc, src)
				if err != nil {
					cells = append(cells, Cell{SizeMiB: size, Strategy: strategy, Backend: backend, Temperature: temp,
						Skipped: "preparing the fork parent failed: " + err.Error()})
					continue
				}
				par = &p
				if temp == Warm {
					// A warm burst follows a burst of the same parent; without a
					// measured cold one, warm the caches with one unmeasured fork.
					r.burst(ctx, svc, *par, size, strategy, backend, "prime", 1)
				}
			}
			if temp == Cold && r.cfg.DropCaches {
				if err := DropPageCache(); err != nil {
					return cells, fmt.Errorf("fork-burst: %w", err)
				}
			}
			cell := r.burst(ctx, svc, *par, size, strategy, backend, temp, r.cfg.Forks)
			cells = append(cells, cell)
			if ctx.Err() != nil {
				return cells, ctx.Err()
			}
		}
		if par != nil {
			par.release(ctx, r, svc)
		}
	}
	return cells, nil
}

// serialForks times cfg.SerialForks forks to Standby one at a time, each
// deleted before the next: the fork's own cost, without a burst's queueing.
func (r *runner) serialForks(ctx context.Context, svc api.Service, src *source, size int, strategy string) SerialFork {
	sf := SerialFork{SizeMiB: size, Strategy: strategy}
	par, err := r.freshParent(ctx, svc, src)
	if err != nil {
		sf.Error = err.Error()
		return sf
	}
	defer par.release(ctx, r, svc)
	r.progress(fmt.Sprintf("%d MiB %s: %d forks of %s, one at a time, each after one link+fsync floor sample", size, strategy, r.cfg.SerialForks, par))
	floor, err := newFloorProbe(r.target.Dir)
	if err != nil {
		sf.Error = err.Error()
		return sf
	}
	defer floor.Close()
	// Floor and fork samples alternate, so whatever else loads the disk
	// weighs on both alike.
	var lat, floors []time.Duration
	for range r.cfg.SerialForks {
		f, err := floor.sample()
		if err != nil {
			sf.Error = err.Error()
			break
		}
		floors = append(floors, f)
		res := r.forkOne(ctx, svc, par, r.name("serial"))
		if res.err != nil {
			sf.Error = res.err.Error()
			break
		}
		lat = append(lat, res.fork)
		r.deleteInstance(ctx, svc, res.id)
	}
	sf.Fork, sf.Floor = Summarize(lat), Summarize(floors)
	return sf
}

// source is the VM every fork of one size and strategy descends from.
type source struct {
	id      string
	cycled  bool // has given a snapshot already: the next needs a new cache key
	sizeMiB int
}

// createSource boots the source VM, lets its workload write its working
// set, and stands it by.
func (r *runner) createSource(ctx context.Context, svc api.Service, size int, strategy string) (*source, error) {
	r.progress(fmt.Sprintf("%d MiB %s: booting the source VM (%s)", size, strategy, r.cfg.bootArgs(size)))
	inst, err := svc.CreateInstance(ctx, api.CreateInstanceRequest{
		Name: r.name("src"), Vcpus: r.cfg.Vcpus, MemoryMiB: size, BootArgs: r.cfg.bootArgs(size),
	})
	if err != nil {
		return nil, fmt.Errorf("create source: %w", err)
	}
	src := &source{id: inst.ID, sizeMiB: size}
	if _, err := r.waitWorkload(ctx, inst.ID, r.wsPages(size)); err != nil {
		r.deleteInstance(ctx, svc, inst.ID)
		return nil, fmt.Errorf("source %s workload: %w", inst.ID, err)
	}
	if _, err := svc.Action(ctx, inst.ID, "standby", api.ActionRequest{}); err != nil {
		r.deleteInstance(ctx, svc, inst.ID)
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
func (p parent) release(ctx context.Context, r *runner, svc api.Service) {
	if p.snapshot {
		r.deleteSnapshot(ctx, svc, p.id)
	}
}

// freshParent gives the source's memory a new cache key, unless it has
// one nobody forked from yet (after the first parent, the source is
// restored, runs a little, and is stood by again), then snapshots it when
// forks are made from snapshots.
func (r *runner) freshParent(ctx context.Context, svc api.Service, src *source) (parent, error) {
	if r.cfg.ForkFrom == FromStandby {
		if err := r.cycle(ctx, svc, src); err != nil {
			return parent{}, err
		}
		return parent{id: src.id}, nil
	}
	snap, err := r.freshSnapshot(ctx, svc, src)
	if err != nil {
		return parent{}, err
	}
	return parent{snapshot: true, id: snap.ID}, nil
}

// cycle restores and re-stands-by a source that already served as a
// parent, which gives its memory a new cache key.
func (r *runner) cycle(ctx context.Context, svc api.Service, src *source) error {
	if src.cycled {
		if _, err := svc.Action(ctx, src.id, "restore", api.ActionRequest{}); err != nil {
			return fmt.Errorf("restore source %s: %w", src.id, err)
		}
		if _, err := r.waitWorkload(ctx, src.id, 100); err != nil {
			return fmt.Errorf("source %s workload: %w", src.id, err)
		}
		if _, err := svc.Action(ctx, src.id, "standby", api.ActionRequest{}); err != nil {
			return fmt.Errorf("standby source %s: %w", src.id, err)
		}
	}
	src.cycled = true
	return nil
}

// freshSnapshot snapshots the source under a new cache key.
func (r *runner) freshSnapshot(ctx context.Context, svc api.Service, src *source) (api.Snapshot, error) {
	if err := r.cycle(ctx, svc, src); err != nil {
		return api.Snapshot{}, err
	}
	snap, err := svc.CreateSnapshot(ctx, src.id, api.SnapshotRequest{Name: r.name("snap")})
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

func (r *runner) deleteInstance(ctx context.Context, svc api.Service, id string) {
	if err := svc.DeleteInstance(context.WithoutCancel(ctx), id); err != nil && !errors.Is(err, api.ErrNotFound) {
		r.progress(fmt.Sprintf("delete instance %s: %v", id, err))
	}
}

func (r *runner) deleteSnapshot(ctx context.Context, svc api.Service, id string) {
	if err := svc.DeleteSnapshot(context.WithoutCancel(ctx), id); err != nil && !errors.Is(err, api.ErrNotFound) {
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
