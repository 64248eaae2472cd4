package instance

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/capacity"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/forktree"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/image"
	"github.com/forkd/forkd/internal/memfile"
	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/pidwatch"
	"github.com/forkd/forkd/internal/store"
	"github.com/prometheus/client_golang/prometheus"
)

// Config is what the manager is built from.
type Config struct {
	// DataDir is the root of the layout of docs/architecture.md §4.
	DataDir string
	// VMM is the resolved VMM binary (ResolveVMM).
	VMM VMMSpec
	// Jail confines every VMM (Jail.Jailer empty: unjailed, development
	// only).
	Jail JailConfig
	// RestoreBackend is the default backend of restores: api.BackendFile or
	// api.BackendUffd. ForkRestoreBackend is the default of a fork's first
	// restore (target_state Running). Empty means file.
	RestoreBackend     string
	ForkRestoreBackend string
	// PagerBinary runs `pager serve` (default: this executable);
	// PagerCacheBytes is its cache budget (0: defaultPagerCacheBytes; the
	// pager itself would read 0 as "no cache").
	PagerBinary     string
	PagerCacheBytes int64
	// Prefetch is PrefetchAuto (record a cache key's working set at its
	// first restore, replay it at every later one) or PrefetchOff; empty
	// means auto. PrefetchWindow is the time budget of a recording (and
	// the window waste is measured over; default 5 s), PrefetchMaxBytes
	// its size budget (default 256 MiB).
	Prefetch         string
	PrefetchWindow   time.Duration
	PrefetchMaxBytes int64
	// ForkStrategy is how a fork gets its mem-file (ForkStrategy*; empty
	// means hardlink). Only hardlink is zero-I/O fanout; reflink and copy
	// exist so benchmarks can compare it with the alternatives.
	ForkStrategy string
	// Network makes and removes VMs' networks (nil: networking is off, and
	// NetworkOffReason says why). The manager owns it: Close closes it.
	// NetworkDefault is whether a create that does not say is networked
	// (network_default).
	Network          *network.Host
	NetworkOffReason string
	NetworkDefault   bool
	// Kernel is the kernel of instances created without one (the daemon's
	// kernel setting); "" leaves them the emulator's placeholder, or
	// refuses them with real Firecracker.
	Kernel string
	// ImageHeadroom is the free space each image's filesystem gets beyond
	// its content (0: image.DefaultHeadroom).
	ImageHeadroom int64
	// NetworkWarm is how many networks to keep made ahead of any VM
	// (netwarm.go); 0: every networked create or fork makes its own.
	NetworkWarm int
	// ForkTreePool is how many empty fork trees to keep made ahead
	// (forktree; forks with memory take them); 0: every fork makes its own.
	ForkTreePool int
	// Logger receives what the manager does (default: slog.Default()).
	Logger *slog.Logger
	// Registerer receives the manager's metrics (nil: not registered).
	Registerer prometheus.Registerer

	// HostPathDirs are the directories under which a remote client (the TCP
	// listener) may name host files (kernel, rootfs); empty: none. Over the
	// Unix socket (root only) any plain host file will do (hostpath).
	HostPathDirs []string

	// Capacity are the host-resource limits every create, start, restore,
	// fork and standby is checked against (internal/capacity); zero values
	// take capacity's defaults. CapacityHost reads the machine (zero:
	// the real one; tests give their own).
	Capacity     capacity.Limits
	CapacityHost capacity.Host

	// OrphansToLostFound lets New start over a store that is missing or
	// empty while guests/ or snapshots/ hold forkd's directories (otherwise
	// ErrStoreLost): the reconciler then moves them all to lost+found.
	OrphansToLostFound bool

	// SuperviseInterval is how often each live instance's supervisor
	// refreshes its memory check and asks the pager about its session
	// (default 5 s). VMM and pager exits are events, not polled.
	SuperviseInterval time.Duration

	// DisableSealing gives a jailed VMM every file of its guest dir to
	// write, shared inodes included, as a jail that ignored who may write
	// which inode would (inodes.go). It exists only so a test can show the
	// breach sealing prevents; never set it elsewhere.
	DisableSealing bool

	// DisableUnshareGuard turns off invariant 3 of docs/architecture.md §3 (never
	// diff-write a mem-file another VM maps). It exists only so a test can
	// show the corruption the guard prevents; never set it elsewhere.
	DisableUnshareGuard bool
	// DisableVMStateGuard lets a VMM write a snapshot's vmstate over the
	// existing file in place, as Firecracker's snapshot create does, even
	// when a fork links it (see writeSnapshot). It exists only so a test can
	// show the corruption the guard prevents; never set it elsewhere.
	DisableVMStateGuard bool
	// DisableDiskGuard lets a VMM be launched on a disk other names link
	// (diskguard.go): its writes reach every fork that links it. It exists
	// only so a test can show the corruption the guard prevents; never set
	// it elsewhere.
	DisableDiskGuard bool
	// DisableTAPActivation leaves a networked VM's TAP down after its VMM
	// attaches (activateTAP is skipped), so the VM runs but nothing reaches
	// it. It exists only so a test can show its first-request check catches
	// a VM that does not answer when its restore returns; never set it
	// elsewhere.
	DisableTAPActivation bool
}

const defaultPagerCacheBytes = 512 << 20

// Manager implements api.Service.
type Manager struct {
	cfg    Config
	layout guestdir.Layout
	db     *store.Store
	log    *slog.Logger
	met    *metrics
	// fs is what checkFilesystem found about the data dir (fsadvice.go).
	fs fsAdvice
	// feed publishes the events GET /events streams (events.go).
	feed *eventFeed
	// faults are errors injected at named points by this package's tests
	// (rollback.go's fault); nil otherwise.
	faults map[string]error
	// faultHook, when a test sets it, runs at every fault point before
	// that point's error is returned: a test can hold an operation there.
	faultHook func(point string)
	// deleteCreatingSnapshots switches off DeleteSnapshot's refusal of a
	// snapshot still being created (tests only: the twin of its test).
	deleteCreatingSnapshots bool
	// files runs every mem-file, disk and kernel copy (memfile), telling
	// noteFullCopy when a sparse copy had to move every byte.
	files  memfile.Options
	images *image.Store

	// ctx is cancelled by Close; background work (compression) uses it and
	// is tracked by wg.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// supWG tracks the supervisors' goroutines (they end with ctx).
	supWG sync.WaitGroup

	pagerOnce pagerState
	netState  netState
	pfs       prefetchState
	warmKick  chan struct{} // wakes warmLoop (netwarm.go)
	netBusy   atomic.Int64  // creates and forks in flight (netwarm.go)
	warmMu    sync.Mutex    // serialises refilling and dropping the warm pool (netwarm.go)
	// jail launches VMMs through a jailer (nil: unjailed).
	jail *jailer
	// trees is the pool of empty fork trees (forktrees.go; nil: none).
	trees *forktree.Pool

	// capacity reserves against the host's resources (capacity.go); what
	// forks and standbys cost on disk depends on fs.reflink.
	capacity *capacity.Ledger

	mu sync.Mutex // guards the maps below; a leaf lock
	// instLocks: the per-instance RW locks (see doc.go).
	instLocks map[string]*sync.RWMutex
	// snapLocks: per-snapshot RW lock and materialisation mutex.
	snapLocks map[string]*snapLock
	// procs: the VMM of each instance whose VMM runs.
	procs map[string]*firecracker.Process
	// sups: the supervisor of each live instance (supervisor.go).
	sups map[string]*supervisor
	// pagerWatches: the exit watch of each pager version's process.
	pagerWatches map[string]*pidwatch.Watch
	// compressing: cancel funcs of running compressions, by snapshot id.
	compressing map[string]context.CancelFunc
}

type snapLock struct {
	rw          sync.RWMutex
	materialise sync.Mutex
}

var _ api.Service = (*Manager)(nil)

// New opens the store under cfg.DataDir, registers metrics and reconciles
// what an earlier run left behind (see Reconcile). The caller must Close it.
func New(ctx context.Context, cfg Config) (_ *Manager, err error) {
	layout, err := guestdir.New(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	if layout, err = layout.WithExec(cfg.VMM.ExecName()); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.RestoreBackend == "" {
		cfg.RestoreBackend = api.BackendFile
	}
	if cfg.ForkRestoreBackend == "" {
		cfg.ForkRestoreBackend = api.BackendFile
	}
	if cfg.ForkStrategy == "" {
		cfg.ForkStrategy = ForkStrategyHardlink
	}
	if err := ValidForkStrategy(cfg.ForkStrategy); err != nil {
		return nil, fmt.Errorf("instance manager: %w", err)
	}
	if cfg.Prefetch == "" {
		cfg.Prefetch = PrefetchAuto
	}
	if err := ValidPrefetch(cfg.Prefetch); err != nil {
		return nil, fmt.Errorf("instance manager: %w", err)
	}
	if cfg.PrefetchWindow <= 0 {
		cfg.PrefetchWindow = defaultPrefetchWindow
	}
	if cfg.PrefetchMaxBytes <= 0 {
		cfg.PrefetchMaxBytes = defaultPrefetchMaxBytes
	}
	for _, b := range []string{cfg.RestoreBackend, cfg.ForkRestoreBackend} {
		if b != api.BackendFile && b != api.BackendUffd {
			return nil, fmt.Errorf("instance manager: restore backend %q: want file or uffd", b)
		}
	}
	if cfg.SuperviseInterval <= 0 {
		cfg.SuperviseInterval = defaultSuperviseInterval
	}
	if cfg.PagerCacheBytes <= 0 {
		cfg.PagerCacheBytes = defaultPagerCacheBytes
	}
	if cfg.VMM.Binary == "" {
		return nil, fmt.Errorf("instance manager: no VMM binary")
	}
	if err := makeDataSubdirs(layout); err != nil {
		return nil, fmt.Errorf("instance manager: %w", err)
	}
	if cfg.VMM.Emulator {
		// The emulator reads and writes snapshots, mem-files and the pager's
		// session sockets only inside the data dir (forkd vmm
		// --confine-paths); jailed, inside its jail root, which is all it
		// sees of the data dir. Firecracker has no such flag: its jail
		// confines it.
		confine := layout.Root()
		if len(cfg.Jail.Jailer) > 0 {
			confine = "/"
		}
		cfg.VMM.Args = append(slices.Clone(cfg.VMM.Args), "--confine-paths", confine)
	}
	if cfg.CapacityHost.MemTotal == nil || cfg.CapacityHost.DiskFree == nil {
		cfg.CapacityHost = capacity.RealHost()
	}
	capLedger, err := capacity.New(cfg.Capacity, cfg.CapacityHost, layout.Root())
	if err != nil {
		return nil, fmt.Errorf("instance manager: %w", err)
	}
	var jl *jailer
	if len(cfg.Jail.Jailer) > 0 {
		if jl, err = newJailer(cfg.Jail, layout, cfg.VMM); err != nil {
			return nil, fmt.Errorf("instance manager: %w", err)
		}
		defer func() {
			if err != nil {
				jl.close(cfg.Logger)
			}
		}()
	} else {
		cfg.Logger.Warn("vmm_jailer none: VMMs run as root, unconfined; a guest that escapes into its VMM owns the host (development only)")
	}
	db, err := openStore(ctx, layout, cfg.OrphansToLostFound, cfg.Logger)
	if err != nil {
		return nil, fmt.Errorf("instance manager: %w", err)
	}
	mctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		cfg: cfg, layout: layout, db: db, log: cfg.Logger, capacity: capLedger, jail: jl,
		ctx: mctx, cancel: cancel,
		instLocks:    map[string]*sync.RWMutex{},
		snapLocks:    map[string]*snapLock{},
		procs:        map[string]*firecracker.Process{},
		sups:         map[string]*supervisor{},
		pagerWatches: map[string]*pidwatch.Watch{},
		compressing:  map[string]context.CancelFunc{},
		pfs: prefetchState{recording: map[string]bool{}, reading: map[string]chan struct{}{}, stats: map[string]*api.Prefetch{},
			cancel: map[string]context.CancelFunc{}, gc: make(chan struct{}, 1)},
		warmKick: make(chan struct{}, 1),
		feed:     newEventFeed(),
	}
	if cfg.Kernel != "" {
		// The kernel setting is checked as a client's kernel would be (a
		// plain file through no symlink, outside the data dir), once now so
		// a bad setting fails the start, and again at each create.
		f, err := m.hostFiles().Open("kernel", cfg.Kernel, false)
		if err != nil {
			db.Close()
			cancel()
			return nil, fmt.Errorf("instance manager: kernel setting: %w", err)
		}
		m.cfg.Kernel = f.Name()
		f.Close()
	}
	m.checkFilesystem()
	m.met = newMetrics(m)
	m.images = image.New(image.Config{Layout: layout, DB: db, Headroom: cfg.ImageHeadroom,
		StepHook: crashPoint, BuildDone: m.noteImageBuild, Logger: cfg.Logger})
	m.files = memfile.Options{FullCopy: m.noteFullCopy}
	if cfg.Registerer != nil {
		if err := m.met.register(cfg.Registerer); err != nil {
			m.images.Close()
			db.Close()
			cancel()
			return nil, fmt.Errorf("instance manager: metrics: %w", err)
		}
	}
	if err := m.migrateLayout(ctx); err != nil {
		m.stopBackground()
		m.images.Close()
		db.Close()
		return nil, fmt.Errorf("instance manager: %w", err)
	}
	if err := m.Reconcile(ctx); err != nil {
		m.stopBackground()
		m.images.Close()
		db.Close()
		return nil, fmt.Errorf("instance manager: reconcile: %w", err)
	}
	// Events from here on: what the reconciler settled is the starting
	// point, not news.
	db.Observe(m.feed.observe)
	insts, err := db.ListInstances(ctx)
	if err == nil {
		var snaps []store.Snapshot
		if snaps, err = db.ListSnapshots(ctx); err == nil {
			m.feed.seed(insts, snaps)
		}
	}
	if err != nil {
		m.stopBackground()
		m.images.Close()
		db.Close()
		return nil, fmt.Errorf("instance manager: %w", err)
	}
	m.startForkTrees()
	m.wg.Add(1)
	go m.runPrefetchGC()
	m.kickPrefetchGC() // recordings of keys removed while the daemon was down
	if cfg.Network != nil && cfg.NetworkWarm > 0 {
		m.wg.Add(1)
		go m.warmLoop()
		if m.netState.ready { // a networked VM exists: keep its pool full
			m.kickWarm()
		}
	}
	return m, nil
}

// Close stops background work and closes the store. Running VMMs and the
// pager keep running: they outlive the daemon by design.
func (m *Manager) Close() error {
	m.stopBackground()
	m.closeForkTrees()
	if m.cfg.Network != nil {
		m.cfg.Network.Close()
	}
	m.images.Close()
	m.jail.close(m.log)
	return m.db.Close()
}

// Health says how this manager confines VMMs (GET /health).
func (m *Manager) Health() api.Health {
	if m.jail == nil {
		return api.Health{Jailer: "none", Warnings: []string{
			"vmm_jailer is none: VMMs run as root and unconfined, so a guest that escapes into its VMM owns the host (development only)"}}
	}
	return api.Health{Jailer: strings.Join(m.jail.cmd, " ")}
}

// stopBackground ends the manager's goroutines (compressions, supervisors,
// pager watches) and waits for them.
func (m *Manager) stopBackground() {
	m.cancel()
	m.wg.Wait()
	m.supWG.Wait()
	m.releasePagerWatches()
}

// Layout is the data directory's layout (tests read paths through it).
func (m *Manager) Layout() guestdir.Layout { return m.layout }

func (m *Manager) instanceLock(id string) *sync.RWMutex {
	m.mu.Lock()
	defer m.mu.Unlock()
	l, ok := m.instLocks[id]
	if !ok {
		l = &sync.RWMutex{}
		m.instLocks[id] = l
	}
	return l
}

// forget drops what the manager keeps in memory for an instance that is
// gone (its lock, VMM and supervisor entries), so the maps shrink with the
// instances. A goroutine still holding or waiting on the old lock finds the
// record gone once it has it.
func (m *Manager) forget(id string) {
	m.unsupervise(id)
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.instLocks, id)
	delete(m.procs, id)
}

// forgetSnapshot drops a deleted snapshot's locks.
func (m *Manager) forgetSnapshot(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.snapLocks, id)
}

func (m *Manager) snapshotLock(id string) *snapLock {
	m.mu.Lock()
	defer m.mu.Unlock()
	l, ok := m.snapLocks[id]
	if !ok {
		l = &snapLock{}
		m.snapLocks[id] = l
	}
	return l
}

func (m *Manager) proc(id string) *firecracker.Process {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.procs[id]
}

func (m *Manager) setProc(id string, p *firecracker.Process) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if p == nil {
		delete(m.procs, id)
	} else {
		m.procs[id] = p
	}
}

// newID returns a random 24-hex-digit id.
func newID() string {
	var b [12]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("crypto/rand: %v", err)) // never fails on Linux
	}
	return hex.EncodeToString(b[:])
}

// apiErr maps store sentinels to api ones, keeping the message.
func apiErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, store.ErrNotFound):
		return fmt.Errorf("%w: %v", api.ErrNotFound, err)
	case errors.Is(err, store.ErrExists):
		return fmt.Errorf("%w: %v", api.ErrExists, err)
	}
	return err
}

// observe records an operation's duration.
func (m *Manager) observe(op string, start time.Time) {
	m.met.opDuration.WithLabelValues(op).Observe(time.Since(start).Seconds())
}
