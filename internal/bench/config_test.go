package bench

import (
	"slices"
	"strings"
	"testing"
)

func TestConfigDefaults(t *testing.T) {
	c, err := Config{}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(c.SizesMiB, []int{1024}) || !slices.Equal(c.Forks, []int{25}) || c.WorkingSetMiB != 64 || !slices.Equal(c.Rates, []int{20000}) ||
		!slices.Equal(c.Prefetch, []string{"auto"}) || c.DiffersRuns != 0 || c.Rounds != 1 ||
		!slices.Equal(c.Strategies, []string{"hardlink"}) || !slices.Equal(c.Backends, []string{"file", "uffd"}) ||
		!slices.Equal(c.Temperatures, []string{"cold", "warm"}) {
		t.Errorf("defaults = %+v", c)
	}
	if c.BatchCalls != 0 {
		t.Errorf("batch calls %d without batch, want 0", c.BatchCalls)
	}
	if c, err = (Config{Batch: true}).withDefaults(); err != nil || c.BatchCalls != 5 {
		t.Errorf("batch calls %d (err %v) with batch, want the default 5", c.BatchCalls, err)
	}
}

// TestConfigRunsEverySettingOnEveryBuild: with builds, every prefetch
// setting gets a daemon of each build, named SETTING@BUILD.
func TestConfigRunsEverySettingOnEveryBuild(t *testing.T) {
	c, err := Config{Prefetch: []string{"off", "auto"}, Builds: []string{"before", "after"}}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"off@before", "off@after", "auto@before", "auto@after"}
	if !slices.Equal(c.Prefetch, want) {
		t.Fatalf("prefetch %v, want %v", c.Prefetch, want)
	}
	if PrefetchSetting("auto@after") != "auto" || BuildOf("auto@after") != "after" || BuildOf("auto") != "" {
		t.Errorf("PrefetchSetting/BuildOf do not split SETTING@BUILD")
	}
}

func TestConfigOrdersColdBeforeWarm(t *testing.T) {
	c, err := Config{Temperatures: []string{"warm", "cold"}}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(c.Temperatures, []string{"cold", "warm"}) {
		t.Errorf("temperatures %v: a warm burst must follow the cold one of its snapshot", c.Temperatures)
	}
}

func TestConfigRejects(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"tiny guest", Config{SizesMiB: []int{8}}, "size 8"},
		{"unknown strategy", Config{Strategies: []string{"deferred"}}, `strategy "deferred"`},
		{"unknown backend", Config{Backends: []string{"nbd"}}, `backend "nbd"`},
		{"unknown temperature", Config{Temperatures: []string{"hot"}}, `temperature "hot"`},
		{"write pct over 100", Config{WritePct: 101}, "out of range"},
		{"negative forks", Config{Forks: []int{25, -1}}, "out of range"},
		{"rate 0", Config{Rates: []int{0}}, "out of range"},
		{"negative rounds", Config{Rounds: -1}, "rounds -1: out of range"},
		{"negative batch calls", Config{Batch: true, BatchCalls: -2}, "-2 batch calls"},
		{"unknown prefetch", Config{Prefetch: []string{"always"}}, `prefetch setting "always"`},
		{"differs without both settings", Config{DiffersRuns: 3, Prefetch: []string{"auto"}}, "add both"},
		{"unknown fork parent", Config{ForkFrom: "running"}, `fork from "running"`},
		{"differs with builds", Config{DiffersRuns: 3, Prefetch: []string{"off", "auto"}, Builds: []string{"a", "b"}}, "without builds"},
		{"a build named twice in a setting", Config{Prefetch: []string{"auto@a"}, Builds: []string{"a"}}, `"auto@a"`},
		{"a build name with @", Config{Builds: []string{"a@b"}}, `build name "a@b"`},
		{"a setting@build without builds", Config{Prefetch: []string{"auto@a"}}, "no build"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.cfg.withDefaults()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("withDefaults(%+v) = %v, want an error mentioning %q", tc.cfg, err, tc.want)
			}
		})
	}
}

func TestBootArgsClampWorkingSetToHalfTheGuest(t *testing.T) {
	c, _ := Config{WorkingSetMiB: 512}.withDefaults()
	if got, want := c.bootArgs(256, -1), "forkd.ws_mib=128 forkd.write_pct=20 forkd.rate=0 forkd.seed=1"; got != want {
		t.Errorf("bootArgs(256, -1) = %q, want %q", got, want)
	}
	c, _ = Config{WorkingSetMiB: 64}.withDefaults()
	if got, want := c.differsBootArgs(1024, 20000), "forkd.ws_mib=512 forkd.write_pct=20 forkd.rate=20000 forkd.seed=1 forkd.load_seed=1"; got != want {
		t.Errorf("differsBootArgs(1024) = %q, want %q", got, want)
	}
}

func TestCopyRunsOnlyUpToCopyMaxMiB(t *testing.T) {
	for _, tc := range []struct {
		name     string
		max      int
		strategy string
		size     int
		skipped  bool
	}{
		{"copy at the default limit", 0, StrategyCopy, 1024, false},
		{"copy above the default limit", 0, StrategyCopy, 4096, true},
		{"hardlink above the limit", 0, StrategyHardlink, 4096, false},
		{"reflink above the limit", 0, StrategyReflink, 4096, false},
		{"copy with no limit", -1, StrategyCopy, 4096, false},
		{"copy above a lower limit", 256, StrategyCopy, 1024, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Config{CopyMaxMiB: tc.max}.withDefaults()
			if err != nil {
				t.Fatal(err)
			}
			if why := c.copySkipped(tc.strategy, tc.size); (why != "") != tc.skipped {
				t.Errorf("copySkipped(%s, %d) with limit %d = %q, want skipped = %v", tc.strategy, tc.size, c.CopyMaxMiB, why, tc.skipped)
			}
		})
	}
}

// A run with uffd-2M is refused up front when the pool of 2 MiB pages
// cannot hold its sources and a burst's working sets, and only then.
func TestConfigNeedsHugePagesForUffd2M(t *testing.T) {
	cfg, err := Config{SizesMiB: []int{256}, WorkingSetMiB: 64, Forks: []int{1, 25},
		Backends: []string{"file", BackendUffdHuge}, Prefetch: []string{PrefetchOff, PrefetchAuto}}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	// Two daemons' sources (2 × 128 pages) and 26 restores of 32 + 4 pages.
	const need = 2*128 + 26*36
	pool := func(free int64) func() (int64, int64, error) {
		return func() (int64, int64, error) { return free + 100, free, nil }
	}
	if err := cfg.enoughHugePages(pool(need - 1)); err == nil || !strings.Contains(err.Error(), "vm.nr_hugepages") {
		t.Errorf("one page short: %v; want a refusal naming vm.nr_hugepages", err)
	}
	if err := cfg.enoughHugePages(pool(need)); err != nil {
		t.Errorf("enough pages: %v", err)
	}
	// Two builds: four daemons, each counted once.
	built, err := Config{SizesMiB: []int{256}, WorkingSetMiB: 64, Forks: []int{1, 25}, Builds: []string{"a", "b"},
		Backends: []string{"file", BackendUffdHuge}, Prefetch: []string{PrefetchOff, PrefetchAuto}}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	const needBuilt = 4*128 + 26*36
	if err := built.enoughHugePages(pool(needBuilt - 1)); err == nil {
		t.Errorf("two builds, one page short: admitted")
	}
	if err := built.enoughHugePages(pool(needBuilt)); err != nil {
		t.Errorf("two builds, enough pages for four daemons: %v", err)
	}
	cfg.Backends = []string{"file", "uffd"}
	if err := cfg.enoughHugePages(pool(0)); err != nil {
		t.Errorf("no uffd-2M, no pool needed: %v", err)
	}
}
