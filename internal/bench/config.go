package bench

import (
	"errors"
	"fmt"
	"slices"
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
	SizesMiB      []int    `json:"sizes_mib"`       // guest RAM sizes; default {1024}
	Vcpus         int      `json:"vcpus"`           // default 1
	WorkingSetMiB int      `json:"working_set_mib"` // forkd.ws_mib; default 64 (at most half the guest)
	WritePct      int      `json:"write_pct"`       // forkd.write_pct; default 20
	Rate          int      `json:"rate"`            // forkd.rate, workload steps/s per VM; default 20000; -1 = unpaced
	Forks         int      `json:"forks"`           // concurrent forks per burst; default 25
	Strategies    []string `json:"strategies"`      // default {hardlink}
	Backends      []string `json:"backends"`        // restore backends; default {file, uffd}
	Temperatures  []string `json:"temperatures"`    // default {cold, warm}
	ForkFrom      string   `json:"fork_from"`       // FromSnapshot (default) | FromStandby
	// SerialForks is how many forks to time one at a time per size and
	// strategy, apart from the bursts (no queueing: the fork's own cost,
	// the figure that must be flat in guest RAM); default 10, -1 none.
	SerialForks int `json:"serial_forks"`
	// CopyMaxMiB is the largest guest size the copy strategy runs at
	// (larger sizes are reported as skipped): a burst of N copies writes N
	// times the guest's RAM (25 × 4 GiB = 100 GiB). Default 1024; -1: no
	// limit.
	CopyMaxMiB int `json:"copy_max_mib"`
	// DropCaches drops the host page cache before each cold burst (root).
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
	if c.Rate == 0 {
		c.Rate = 20000
	}
	if c.Forks == 0 {
		c.Forks = 25
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
	if c.ForkFrom == "" {
		c.ForkFrom = FromSnapshot
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
	if c.Forks < 1 || c.WorkingSetMiB < 1 || c.WritePct < 0 || c.WritePct > 100 || c.Rate < -1 || c.Vcpus < 1 {
		return c, fmt.Errorf("fork-burst config: forks %d, working set %d MiB, write %d%%, rate %d, vcpus %d: out of range",
			c.Forks, c.WorkingSetMiB, c.WritePct, c.Rate, c.Vcpus)
	}
	for _, list := range []struct {
		name  string
		got   []string
		known []string
	}{
		{"strategy", c.Strategies, []string{StrategyHardlink, StrategyReflink, StrategyCopy}},
		{"backend", c.Backends, []string{api.BackendFile, api.BackendUffd}},
		{"temperature", c.Temperatures, []string{Cold, Warm}},
	} {
		for _, v := range list.got {
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

// bootArgs configures the emulator's workload for a guest of sizeMiB.
func (c Config) bootArgs(sizeMiB int) string {
	return fmt.Sprintf("forkd.ws_mib=%d forkd.write_pct=%d forkd.rate=%d forkd.seed=1",
		c.workingSetMiB(sizeMiB), c.WritePct, c.rate())
}

// copySkipped says why the copy strategy does not run at sizeMiB, or "".
func (c Config) copySkipped(strategy string, sizeMiB int) string {
	if strategy != StrategyCopy || c.CopyMaxMiB < 0 || sizeMiB <= c.CopyMaxMiB {
		return ""
	}
	return fmt.Sprintf("copy runs only up to %d MiB (--copy-max-mib): a burst of %d copies of %d MiB would write %d GiB",
		c.CopyMaxMiB, c.Forks, sizeMiB, c.Forks*sizeMiB/1024)
}

// rate is forkd.rate: 0 asks the emulator for an unpaced workload.
func (c Config) rate() int { return max(c.Rate, 0) }
