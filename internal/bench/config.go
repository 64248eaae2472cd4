package bench

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// Fork strategies: how each fork gets its mem-file.
const (
	StrategyHardlink = "hardlink" // forkd's default: one inode, one page cache for all siblings
	StrategyReflink  = "reflink"  // per-fork FICLONE: shared extents, separate page caches
	StrategyCopy     = "copy"     // per-fork full copy
)

// Cache temperatures of a burst.
const (
	// Cold: a snapshot with a new cache key (the pager has none of its
	// pages) and, when DropCaches is set, an empty host page cache.
	Cold = "cold"
	// Warm: a second burst from the snapshot a previous burst used.
	Warm = "warm"
)

// Prefetch settings of the daemons (the daemon's `prefetch`).
const (
	PrefetchOff  = "off"
	PrefetchAuto = "auto"
)

// Workloads of a burst's forks.
const (
	// WorkloadSame: every fork runs the workload its snapshot was recorded
	// with (the emulator's workload is deterministic from the vmstate).
	WorkloadSame = "same"
	// WorkloadDiffers: each fork reads other pages than the recording holds.
	WorkloadDiffers = "differs"
)

// What forks are made from.
const (
	FromSnapshot = "snapshot" // a snapshot in the store (POST /snapshots/{id}/fork)
	FromStandby  = "standby"  // the Standby source instance (POST /instances/{id}/fork)
)

// ErrStrategyUnsupported is returned by a Target that cannot fork with a
// strategy; its cells are reported as skipped, not failed.
var ErrStrategyUnsupported = errors.New("fork strategy not supported by this daemon")

// Config is one fork-burst run.
type Config struct {
	SizesMiB      []int `json:"sizes_mib"`       // guest RAM sizes; default {1024}
	Vcpus         int   `json:"vcpus"`           // default 1
	WorkingSetMiB int   `json:"working_set_mib"` // forkd.ws_mib; default 64 (at most half the guest)
	WritePct      int   `json:"write_pct"`       // forkd.write_pct; default 20
	// Rates are the workload paces measured (forkd.rate, steps/s per VM;
	// -1 = unpaced), one source VM each; default {20000}.
	Rates []int `json:"rates"`
	// Forks are the burst sizes (concurrent forks per burst); default {25}.
	Forks      []int    `json:"forks"`
	Strategies []string `json:"strategies"` // default {hardlink}
	// Prefetch are the daemons' prefetch settings compared (off, auto);
	// default {auto}, the daemon's default. With Builds, each setting is
	// run by each build and named SETTING@BUILD (auto@before).
	Prefetch []string `json:"prefetch"`
	// Builds name forkd binaries compared side by side (a before and an
	// after of a change): every prefetch setting gets a daemon of each,
	// all up at once, their bursts taking turns. Empty: one binary.
	Builds []string `json:"builds,omitempty"`
	// DiffersRuns is how many times to run the case prefetch cannot help:
	// forks whose workload differs from the recorded one (0: never). It
	// needs both prefetch settings.
	DiffersRuns int `json:"differs_runs"`
	// Rounds is how many times every burst of the same workload runs
	// (default 1). The rounds take turns: round 1 of every backend and
	// daemon, then round 2, so drift on a noisy machine falls on all of
	// them alike. A 1-fork cell is one sample; its budgets, and every
	// ratio of burst cells, are then quoted as the median of the rounds'
	// ratios, with their spread.
	Rounds int `json:"rounds,omitempty"`
	// Backends are the restore backends (default {file, uffd}), and
	// BackendUffdHuge: uffd restores of a source backed by 2 MiB pages.
	Backends     []string `json:"backends"`
	Temperatures []string `json:"temperatures"` // default {cold, warm}
	ForkFrom     string   `json:"fork_from"`    // FromSnapshot (default) | FromStandby
	// SerialForks is how many forks to time one at a time per size,
	// strategy and daemon (each prefetch setting of each build), apart
	// from the bursts (no queueing: the fork's own cost, the figure that
	// must be flat in guest RAM); the daemons of one size and strategy take
	// turns. Default 10, -1 none.
	SerialForks int `json:"serial_forks"`
	// Batch also times each burst's forks made by one batch call
	// (POST .../forks: every fork returns when the call does), before the
	// concurrent calls; those forks are deleted at once, not restored.
	Batch bool `json:"batch,omitempty"`
	// BatchCalls is how many batch calls each burst makes with Batch, one
	// after another, each deleted before the next: a call is one sample of
	// a batched fork's latency, and the p50 of the calls is what a serial
	// fork's p50 is set against. Default 5.
	BatchCalls int `json:"batch_calls,omitempty"`
	// CopyMaxMiB is the largest guest size the copy strategy runs at
	// (larger sizes are reported as skipped): a burst of N copies writes N
	// times the guest's RAM (25 × 4 GiB = 100 GiB). Default 1024; -1: no
	// limit.
	CopyMaxMiB int `json:"copy_max_mib"`
	// DropCaches drops the host page cache (and the kernel's dentry and
	// inode caches) before each cold burst, before each of its batch calls
	// and again before its concurrent calls, and times a second series of
	// serial forks, each right after a drop, for the cold bursts to be set
	// against (root).
	DropCaches bool `json:"drop_caches"`
	// TouchTimeout bounds the wait for one fork's workload to cover its
	// working set; default 2 min.
	TouchTimeout time.Duration `json:"touch_timeout_ns"`
}

// withDefaults fills zero fields and validates the rest.
func (c Config) withDefaults() (Config, error) {
	if len(c.SizesMiB) == 0 {
		c.SizesMiB = []int{1024}
	}
	if c.Vcpus == 0 {
		c.Vcpus = 1
	}
	if c.WorkingSetMiB == 0 {
		c.WorkingSetMiB = 64
	}
	if c.WritePct == 0 {
		c.WritePct = 20
	}
	if len(c.Rates) == 0 {
		c.Rates = []int{20000}
	}
	if len(c.Forks) == 0 {
		c.Forks = []int{25}
	}
	if len(c.Prefetch) == 0 {
		c.Prefetch = []string{PrefetchAuto}
	}
	if len(c.Strategies) == 0 {
		c.Strategies = []string{StrategyHardlink}
	}
	if len(c.Backends) == 0 {
		c.Backends = []string{api.BackendFile, api.BackendUffd}
	}
	if len(c.Temperatures) == 0 {
		c.Temperatures = []string{Cold, Warm}
	}
	if c.SerialForks == 0 {
		c.SerialForks = 10
	}
	if c.CopyMaxMiB == 0 {
		c.CopyMaxMiB = 1024
	}
	if c.BatchCalls < 0 {
		return c, fmt.Errorf("fork-burst config: %d batch calls: want at least 1", c.BatchCalls)
	}
	if c.Batch && c.BatchCalls == 0 {
		c.BatchCalls = 5
	}
	if c.ForkFrom == "" {
		c.ForkFrom = FromSnapshot
	}
	if c.Rounds == 0 {
		c.Rounds = 1
	}
	if c.ForkFrom != FromSnapshot && c.ForkFrom != FromStandby {
		return c, fmt.Errorf("fork-burst config: fork from %q: want %s or %s", c.ForkFrom, FromSnapshot, FromStandby)
	}
	if c.TouchTimeout == 0 {
		c.TouchTimeout = 2 * time.Minute
	}
	for _, s := range c.SizesMiB {
		if s < 16 {
			return c, fmt.Errorf("fork-burst config: size %d MiB: want at least 16", s)
		}
	}
	if slices.Min(c.Forks) < 1 || c.WorkingSetMiB < 1 || c.WritePct < 0 || c.WritePct > 100 || slices.Min(c.Rates) < -1 ||
		slices.Contains(c.Rates, 0) || c.Vcpus < 1 || c.DiffersRuns < 0 || c.Rounds < 1 {
		return c, fmt.Errorf("fork-burst config: forks %v, working set %d MiB, write %d%%, rates %v, vcpus %d, differs runs %d, rounds %d: out of range",
			c.Forks, c.WorkingSetMiB, c.WritePct, c.Rates, c.Vcpus, c.DiffersRuns, c.Rounds)
	}
	if len(c.Builds) > 0 {
		if c.DiffersRuns > 0 {
			return c, fmt.Errorf("fork-burst config: the differing-workload runs compare one binary's prefetch off and auto: run them without builds")
		}
		var pfs []string
		for _, pf := range c.Prefetch {
			if strings.Contains(pf, "@") {
				return c, fmt.Errorf("fork-burst config: prefetch setting %q: with builds give the setting alone (off, auto)", pf)
			}
			for _, b := range c.Builds {
				if b == "" || strings.ContainsAny(b, "@, ") {
					return c, fmt.Errorf("fork-burst config: build name %q: want a non-empty name without '@', ',' or spaces", b)
				}
				pfs = append(pfs, pf+"@"+b)
			}
		}
		c.Prefetch = pfs
	}
	if c.DiffersRuns > 0 && !(slices.Contains(c.Prefetch, PrefetchOff) && slices.Contains(c.Prefetch, PrefetchAuto)) {
		return c, fmt.Errorf("fork-burst config: the differing-workload runs compare prefetch off and auto: add both to the prefetch settings")
	}
	for _, list := range []struct {
		name  string
		got   []string
		known []string
	}{
		{"strategy", c.Strategies, []string{StrategyHardlink, StrategyReflink, StrategyCopy}},
		{"backend", c.Backends, []string{api.BackendFile, api.BackendUffd, BackendUffdHuge}},
		{"temperature", c.Temperatures, []string{Cold, Warm}},
		{"prefetch setting", c.Prefetch, []string{PrefetchOff, PrefetchAuto}},
	} {
		for _, v := range list.got {
			if list.name == "prefetch setting" {
				if b := BuildOf(v); b != "" && !slices.Contains(c.Builds, b) {
					return c, fmt.Errorf("fork-burst config: prefetch setting %q: no build %q", v, b)
				}
				v = PrefetchSetting(v)
			}
			if !slices.Contains(list.known, v) {
				return c, fmt.Errorf("fork-burst config: unknown %s %q (want one of %v)", list.name, v, list.known)
			}
		}
	}
	// Cold before warm: a warm burst reuses the cold burst's snapshot.
	slices.SortStableFunc(c.Temperatures, func(a, b string) int {
		return boolInt(a == Warm) - boolInt(b == Warm)
	})
	return c, nil
}

// PrefetchSetting is the daemon's prefetch setting of a cell's or
// variant's prefetch name: auto for auto and auto@before.
func PrefetchSetting(pf string) string {
	setting, _, _ := strings.Cut(pf, "@")
	return setting
}

// BuildOf is the build a prefetch name runs on ("" for the one binary).
func BuildOf(pf string) string {
	_, build, _ := strings.Cut(pf, "@")
	return build
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// workingSetMiB is the working set a guest of sizeMiB gets: at most half
// its RAM, as the emulator clamps it.
func (c Config) workingSetMiB(sizeMiB int) int {
	return min(c.WorkingSetMiB, sizeMiB/2)
}

// bootArgs configures the emulator's workload for a guest of sizeMiB at
// rate steps/s (-1: unpaced).
func (c Config) bootArgs(sizeMiB, rate int) string {
	return fmt.Sprintf("forkd.ws_mib=%d forkd.write_pct=%d forkd.rate=%d forkd.seed=1",
		c.workingSetMiB(sizeMiB), c.WritePct, max(rate, 0))
}

// differsMultiple is how much larger the working set of the differing
// workload is than the pages each fork reads of it.
const differsMultiple = 8

// differsBootArgs configure the workload prefetch cannot help: a working
// set differsMultiple times what a fork reads (up to half the guest), each
// load reading its own random pages of it (forkd.load_seed), so a fork
// shares about 1/differsMultiple of its pages with any one recording.
func (c Config) differsBootArgs(sizeMiB, rate int) string {
	return fmt.Sprintf("forkd.ws_mib=%d forkd.write_pct=%d forkd.rate=%d forkd.seed=1 forkd.load_seed=1",
		min(c.workingSetMiB(sizeMiB)*differsMultiple, sizeMiB/2), c.WritePct, max(rate, 0))
}

// roundOf is a same-workload cell's Run in round (from 1): 0 when the run
// has one round, as reports before rounds existed have.
func (c Config) roundOf(round int) int {
	if c.Rounds > 1 {
		return round
	}
	return 0
}

// maxForks is the largest burst.
func (c Config) maxForks() int { return slices.Max(c.Forks) }

// copySkipped says why the copy strategy does not run at sizeMiB, or "".
func (c Config) copySkipped(strategy string, sizeMiB int) string {
	if strategy != StrategyCopy || c.CopyMaxMiB < 0 || sizeMiB <= c.CopyMaxMiB {
		return ""
	}
	return fmt.Sprintf("copy runs only up to %d MiB (--copy-max-mib): a burst of %d copies of %d MiB would write %d GiB",
		c.CopyMaxMiB, c.maxForks(), sizeMiB, c.maxForks()*sizeMiB/1024)
}

// BackendUffdHuge is the bench's backend of uffd restores of a source whose
// guest memory is backed by 2 MiB pages (huge_pages 2M), and so are its
// forks': the pager installs 2 MiB pages. Firecracker restores such memory
// with the uffd backend only.
const BackendUffdHuge = "uffd-2M"

// restoreBackend is the API's backend of a bench backend.
func restoreBackend(backend string) string {
	if backend == BackendUffdHuge {
		return api.BackendUffd
	}
	return backend
}

// hugeBackend reports whether backend's source is backed by 2 MiB pages.
func hugeBackend(backend string) bool { return backend == BackendUffdHuge }

// enoughHugePages refuses a run with BackendUffdHuge that the host's pool
// of 2 MiB pages (pool: total and free pages) cannot hold: every daemon's
// source whole (they are up at once), and a burst's forks and the
// recording restore their working set each, plus a few pages for what the
// guest touches besides. A pool that runs dry mid-burst would stall forks
// until their timeout instead.
func (c Config) enoughHugePages(pool func() (total, free int64, err error)) error {
	if !slices.ContainsFunc(c.Backends, hugeBackend) {
		return nil
	}
	sz := slices.Max(c.SizesMiB)
	const slack = 4 // pages per VM beyond its working set
	// One daemon per prefetch setting (withDefaults has made them one per
	// setting and build), each with its source.
	need := int64(len(c.Prefetch)*sz/2 + (c.maxForks()+1)*(c.workingSetMiB(sz)/2+slack))
	total, free, err := pool()
	if err != nil {
		return fmt.Errorf("fork-burst: %s: %w", BackendUffdHuge, err)
	}
	if free < need {
		return fmt.Errorf("fork-burst: %s needs about %d free 2 MiB pages (%d MiB) and the host has %d: raise vm.nr_hugepages (sysctl -w vm.nr_hugepages=%d) or drop %s from --backends",
			BackendUffdHuge, need, need*2, free, total+need-free, BackendUffdHuge)
	}
	return nil
}
