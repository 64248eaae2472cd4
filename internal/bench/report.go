package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// Report is the result of one run.
type Report struct {
	Machine  Machine       `json:"machine"`
	Config   Config        `json:"config"`
	Started  time.Time     `json:"started"`
	Duration time.Duration `json:"duration_ns"`
	Cells    []Cell        `json:"cells"`
	Serial   []SerialFork  `json:"serial_forks"`
}

// SerialFork is the latency of forks made one at a time (to Standby, each
// deleted before the next) by one daemon: the fork's own cost. Every daemon
// of a size and strategy has one; their forks alternate (serialForks).
type SerialFork struct {
	SizeMiB  int    `json:"size_mib"`
	Strategy string `json:"strategy"`
	// Prefetch names the daemon as Cell.Prefetch does: its prefetch
	// setting, SETTING@BUILD with builds. Reports made before every daemon
	// timed serial forks have only the first daemon's, without it.
	Prefetch string `json:"prefetch,omitempty"`
	// Build is the name of the daemon's --binary ("" without builds).
	Build string `json:"build,omitempty"`
	// Temperature is "" for forks made one after another, and Cold for
	// forks each made right after the host's page cache and the kernel's
	// dentry and inode caches were dropped (Config.DropCaches): what a cold
	// burst's batch calls are set against, like for like.
	Temperature string  `json:"temperature,omitempty"`
	Fork        Summary `json:"fork"`
	// Floor is one link() plus an fsync of its directory on the data dir's
	// filesystem, sampled before each fork: the physical limit of a durable
	// fork, measured alongside it.
	Floor Summary `json:"floor"`
	// ForkCPU is the CPU time per fork over the fork calls alone (nil when
	// the daemon's pid is unknown).
	ForkCPU *ForkCPU `json:"fork_cpu,omitempty"`
	Error   string   `json:"error,omitempty"`
	// Samples are the latencies behind Fork and Floor (JSON only).
	Samples *SerialSamples `json:"samples,omitempty"`
}

// SerialSamples are one daemon's serial fork latencies and the floor
// sample taken just before each, in the order taken.
type SerialSamples struct {
	Fork  []time.Duration `json:"fork_ns"`
	Floor []time.Duration `json:"floor_ns"`
}

// Machine says where the numbers come from.
type Machine struct {
	Kernel   string `json:"kernel"`
	CPUs     int    `json:"cpus"`
	MemBytes int64  `json:"mem_bytes"`
	DataDir  string `json:"data_dir"`
	FSType   string `json:"fs_type"`
	Device   string `json:"device"`
	VMM      string `json:"vmm"`
}

// Cell is one burst: N concurrent forks of one snapshot of one guest size,
// forked with one strategy and restored with one backend, cold or warm.
type Cell struct {
	SizeMiB  int    `json:"size_mib"`
	Strategy string `json:"strategy"`
	// Prefetch is the daemon's prefetch setting (off, auto).
	Prefetch string `json:"prefetch"`
	// Rate is the workload's pace (steps/s per VM; -1 unpaced).
	Rate        int    `json:"rate"`
	Backend     string `json:"backend"`
	Temperature string `json:"temperature"`
	// Workload is WorkloadSame or WorkloadDiffers. Run is a differing
	// workload's run, or the same workload's round when the run had
	// several (Config.Rounds); 0 otherwise.
	Workload string `json:"workload"`
	Run      int    `json:"run,omitempty"`
	// Skipped says why the cell was not run ("" when it was).
	Skipped string `json:"skipped,omitempty"`

	Forks  int      `json:"forks"`
	Failed int      `json:"failed"`
	Errors []string `json:"errors,omitempty"` // first few

	// Fork is the fork API call (to Standby: the fanout itself), all N
	// concurrently.
	Fork Summary `json:"fork"`
	// Restore is the restore API call (Standby → Running), all N
	// concurrently once every fork returned.
	Restore Summary `json:"restore"`
	// Touch is from the end of the restore until the fork's workload had
	// read as many pages as its working set holds.
	Touch Summary `json:"touch"`
	// ToWorkingSet is from the restore call until the working set was read
	// (restore + touch, per fork).
	ToWorkingSet Summary `json:"to_working_set"`
	// PrefetchStats sums the forks' prefetch figures once final (nil with
	// prefetch off).
	PrefetchStats *PrefetchSum `json:"prefetch_stats,omitempty"`
	// Samples are the per-fork latencies behind Fork, Restore and Touch,
	// in fork order, for distributions (JSON only).
	Samples *Samples `json:"samples,omitempty"`
	// ForkWall is the fork phase alone: first fork call to last fork return.
	ForkWall time.Duration `json:"fork_wall_ns"`
	// Batch is the same N forks made by one batch call (Config.Batch), nil
	// when not asked for.
	Batch *BatchFork `json:"batch,omitempty"`
	// ForkCPU is the fork phase's CPU time per fork, the daemon's and the
	// benchmark's own (nil when the daemon's pid is unknown).
	ForkCPU *ForkCPU `json:"fork_cpu,omitempty"`
	// Wall is the whole burst, first fork call to last working set touched.
	Wall time.Duration `json:"wall_ns"`

	// Pager is the pager's counters over the burst (nil when unavailable).
	Pager *PagerCounters `json:"pager,omitempty"`
	// DiskReadBytes were read from the data dir's device during the burst
	// (-1 when unknown); DiskUsedBytes is what the burst allocated on it.
	DiskReadBytes int64 `json:"disk_read_bytes"`
	DiskUsedBytes int64 `json:"disk_used_bytes"`
	// VMMReadBytes sums /proc/PID/io read_bytes of the fork VMMs (File
	// restores fault the mem-file in themselves); PagerReadBytes is the
	// pager's over the burst (Uffd restores), -1 when unknown.
	VMMReadBytes   int64 `json:"vmm_read_bytes"`
	PagerReadBytes int64 `json:"pager_read_bytes"`
	// Memory sums smaps_rollup over the fork VMMs once every working set
	// was touched: Pss is what the forks cost together (density).
	Memory MemUsage `json:"memory"`
	// PagerCPU is the pager's CPU time (every thread, user and kernel) over
	// the burst, per fork: a Uffd fork's installs are copies the pager
	// makes (0: unknown, or no pager).
	PagerCPU time.Duration `json:"pager_cpu_per_fork_ns,omitempty"`
	// PagerMemory is the pager process's memory after the burst (its page
	// cache), nil without a pager.
	PagerMemory *MemUsage `json:"pager_memory,omitempty"`
	// MemoryChecks counts forks by memory_check ("ok" or an error).
	MemoryChecks map[string]int `json:"memory_checks"`
	// ForkModes counts forks by the fork_mode the daemon reported.
	ForkModes map[string]int `json:"fork_modes"`
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteTable writes the report for people: one row per cell, then the
// ratios that matter.
func (r *Report) WriteTable(w io.Writer) error {
	fmt.Fprintf(w, "fork-burst: %v forks/burst, working set %d MiB, rates %v, prefetch %v, %s on %s (%s), %d CPUs, kernel %s, vmm %s\n\n",
		r.Config.Forks, r.Config.WorkingSetMiB, r.Config.Rates, r.Config.Prefetch, r.Machine.DataDir, r.Machine.Device, r.Machine.FSType,
		r.Machine.CPUs, r.Machine.Kernel, r.Machine.VMM)
	fmt.Fprintln(w, "latency (fork: API call to Standby; restore: to Running; touch: until the workload read its working set; rate -1: unpaced)")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "size\tstrategy\tprefetch\trate\tworkload\tbackend\ttemp\tok\tfork p50\tp95\tmax\tforks wall\trestore p50\tp95\tmax\ttouch p50\tp95\tburst\tmemory_check\t")
	for _, c := range r.Cells {
		if c.Skipped != "" {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\t%s\t%s\tskipped\t\t\t\t\t\t\t\t\t\t\t\t\n", c.SizeMiB, c.Strategy, c.Prefetch, c.Rate, c.workloadStr(), c.Backend, c.Temperature)
			continue
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\t%s\t%s\t%d/%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n",
			c.SizeMiB, c.Strategy, c.Prefetch, c.Rate, c.workloadStr(), c.Backend, c.Temperature, c.Forks-c.Failed, c.Forks,
			durStr(c.Fork.P50), durStr(c.Fork.P95), durStr(c.Fork.Max), durStr(c.ForkWall),
			durStr(c.Restore.P50), durStr(c.Restore.P95), durStr(c.Restore.Max),
			durStr(c.Touch.P50), durStr(c.Touch.P95), durStr(c.Wall), checksStr(c.MemoryChecks))
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	if err := r.writeBatches(w); err != nil {
		return err
	}

	fmt.Fprintln(w, "\nresources (pager and disk over the burst; memory of the N fork VMMs summed, and of the pager, after it; pager cpu: the pager's CPU time over the burst per fork; fork cpu: CPU time per fork over the fork calls, daemon+this client)")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "size\tstrategy\tprefetch\trate\tforks\tbackend\ttemp\thit%\tmisses\tbacking\tfault p50\tp95\tdisk read\tvmm read\tpager read\tdisk alloc\tPSS\tRSS\tpager RSS\tpager cpu\tmode\tfork cpu\t")
	for _, c := range r.Cells {
		if c.Skipped != "" {
			continue
		}
		hit, misses, backing, fp50, fp95, pagerRSS := "-", "-", "-", "-", "-", "-"
		if p := c.Pager; p != nil {
			if p.Hits+p.Misses > 0 {
				hit = fmt.Sprintf("%.1f", 100*p.HitRate())
			}
			misses = fmt.Sprint(p.Misses)
			backing = bytesStr(p.BackingBytes)
			fp50, fp95 = durStr(p.FaultLatency.Quantile(0.5)), durStr(p.FaultLatency.Quantile(0.95))
		}
		if c.PagerMemory != nil {
			pagerRSS = bytesStr(c.PagerMemory.Rss)
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n",
			c.SizeMiB, c.Strategy, c.Prefetch, c.Rate, c.Forks, c.Backend, c.Temperature, hit, misses, backing, fp50, fp95,
			bytesStr(c.DiskReadBytes), bytesStr(c.VMMReadBytes), bytesStr(c.PagerReadBytes), bytesStr(c.DiskUsedBytes),
			bytesStr(c.Memory.Pss), bytesStr(c.Memory.Rss), pagerRSS, durStr(c.PagerCPU), modesStr(c.ForkModes), cpuStr(c.ForkCPU))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if err := r.writePrefetchTable(w); err != nil {
		return err
	}
	if err := r.writeRoundsTable(w); err != nil {
		return err
	}
	if err := r.writeSerialTable(w); err != nil {
		return err
	}
	if rs := r.Ratios(); len(rs) > 0 {
		fmt.Fprintln(w, "\nratios (same run, same machine):")
		for _, x := range rs {
			fmt.Fprintf(w, "  %-58s %8.2fx\n", x.Name, x.Value)
		}
	}
	skipped := map[string]bool{}
	for _, c := range r.Cells {
		if c.Skipped != "" && !skipped[c.Strategy+"/"+c.Backend] {
			skipped[c.Strategy+"/"+c.Backend] = true
			fmt.Fprintf(w, "skipped %s/%s: %s\n", c.Strategy, c.Backend, c.Skipped)
		}
	}
	for _, c := range r.Cells {
		for _, e := range c.Errors {
			fmt.Fprintf(w, "error %d MiB %s/%s/%s: %s\n", c.SizeMiB, c.Strategy, c.Backend, c.Temperature, e)
		}
	}
	return nil
}

// writeSerialTable writes the serial forks, one row per daemon: its
// p50 over its own floor samples' and, when builds are compared, over the
// first build's p50.
func (r *Report) writeSerialTable(w io.Writer) error {
	if len(r.Serial) == 0 {
		return nil
	}
	builds := len(r.Config.Builds) > 1
	fmt.Fprint(w, "\nserial forks (one at a time, to Standby: the fork's own cost; floor: one link() + fsync(dir) on the same filesystem, sampled before each fork; cpu/fork: CPU time per fork call, daemon+this client; temp cold: each fork right after the caches were dropped")
	if len(r.Config.Prefetch) > 1 {
		fmt.Fprintf(w, "; the daemons take turns every %d forks", SerialRound)
	}
	if builds {
		fmt.Fprintf(w, "; binary: the --binary name, p50/%s: this row's p50 over the %s row's", r.Config.Builds[0], r.Config.Builds[0])
	}
	fmt.Fprintln(w, ")")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	head := "size\tstrategy\tprefetch\tbinary\ttemp\tn\tp50\tp95\tmax\tfloor p50\tp95\tp50/floor\tcpu/fork\t"
	if builds {
		head += "p50/" + r.Config.Builds[0] + "\t"
	}
	fmt.Fprintln(tw, head+"error\t")
	for i := range r.Serial {
		s := &r.Serial[i]
		over, vs := "-", "-"
		if s.Floor.P50 > 0 && s.Fork.P50 > 0 {
			over = fmt.Sprintf("%.2fx", float64(s.Fork.P50)/float64(s.Floor.P50))
		}
		if b := r.serialBase(s); b != nil && s.Fork.P50 > 0 {
			vs = fmt.Sprintf("%.2fx", float64(s.Fork.P50)/float64(b.Fork.P50))
		}
		temp := s.Temperature
		if temp == "" {
			temp = Warm
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t", s.SizeMiB, s.Strategy, orDash(PrefetchSetting(s.Prefetch)), orDash(s.Build), temp,
			s.Fork.N, durStr(s.Fork.P50), durStr(s.Fork.P95), durStr(s.Fork.Max), durStr(s.Floor.P50), durStr(s.Floor.P95), over, cpuStr(s.ForkCPU))
		if builds {
			fmt.Fprintf(tw, "%s\t", vs)
		}
		fmt.Fprintf(tw, "%s\t\n", truncateStr(s.Error, 60))
	}
	return tw.Flush()
}

// writeBatches prints the bursts' batch calls (Config.Batch), if any.
func (r *Report) writeBatches(w io.Writer) error {
	if !r.Config.Batch {
		return nil
	}
	fmt.Fprintln(w, "\nbatch (the same N forks made by one batch call, POST .../forks, before the concurrent calls, calls times one after another; each fork returns with its call; fork cpu: per fork, daemon+this client)")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "size\tstrategy\tprefetch\trate\tworkload\tbackend\ttemp\tforks\tcalls\tbatch call p50\tmin\tmax\tconcurrent calls: fork p50\twall\tfork cpu\terror\t")
	for _, c := range r.Cells {
		if c.Skipped != "" || c.Batch == nil {
			continue
		}
		calls := Summarize(c.Batch.Calls)
		if calls.N == 0 && c.Batch.Err == "" { // a report from before the calls were kept
			calls = Summarize([]time.Duration{c.Batch.Call})
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n",
			c.SizeMiB, c.Strategy, c.Prefetch, c.Rate, c.workloadStr(), c.Backend, c.Temperature, c.Forks,
			calls.N, durStr(c.Batch.Call), durStr(calls.Min), durStr(calls.Max), durStr(c.Fork.P50), durStr(c.ForkWall), cpuStr(c.Batch.CPU), c.Batch.Err)
	}
	return tw.Flush()
}

// BatchFork is a burst's forks made by one batch call, Config.BatchCalls
// times: every fork's latency is its call's.
type BatchFork struct {
	Call  time.Duration   `json:"call_ns"`            // the calls' p50
	Calls []time.Duration `json:"calls_ns,omitempty"` // each call's time (a report before them has only call_ns)
	CPU   *ForkCPU        `json:"fork_cpu,omitempty"` // per fork, over every call
	Err   string          `json:"error,omitempty"`    // the call that failed ended the series
}

// cpuStr is a ForkCPU as daemon+client, "-" when unknown.
func cpuStr(c *ForkCPU) string {
	if c == nil {
		return "-"
	}
	return durStr(c.Daemon) + "+" + durStr(c.Client)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// PrefetchSum is a burst's forks' prefetch figures (GET /instances/{id}).
type PrefetchSum struct {
	Modes map[string]int `json:"modes"` // forks by mode: record, replay, none
	// PagesRecorded is the recording's size (the largest any fork reports).
	PagesRecorded uint64 `json:"pages_recorded"`
	// PagesPrefetched and PagesWasted are summed over the forks.
	PagesPrefetched uint64 `json:"pages_prefetched"`
	PagesWasted     uint64 `json:"pages_wasted"`
	// WorkingSet are the forks' working_set_ms (replays that brought the
	// whole recording in).
	WorkingSet []time.Duration `json:"working_set_ns"`
}

// WastePct is wasted / prefetched pages in percent (0 with none prefetched).
func (p *PrefetchSum) WastePct() float64 {
	if p == nil {
		return 0
	}
	return 100 * ratio(float64(p.PagesWasted), float64(p.PagesPrefetched))
}

// Samples are one burst's per-fork latencies.
type Samples struct {
	Fork    []time.Duration `json:"fork_ns"`
	Restore []time.Duration `json:"restore_ns"`
	Touch   []time.Duration `json:"touch_ns"`
	// ToWorkingSet is restore+touch of each fork that read its working set.
	ToWorkingSet []time.Duration `json:"to_working_set_ns,omitempty"`
}

// Ratio is one comparison the benchmark exists to show.
type Ratio struct {
	Name  string  `json:"name"`
	Value float64 `json:"value"`
}

// Ratios compares cells of the same run: strategies against hardlink, the
// largest size against the smallest, warm against cold, File against Uffd
// (at the first prefetch setting and rate and the largest burst), then the
// prefetch budgets (prefetchRatios). A ratio of two burst cells pairs the
// cells of one round; with several rounds it is quoted as the median of
// the rounds' ratios and their spread (roundRatios). Serial forks are not
// in rounds: a burst cell against them is taken per round the same way.
func (r *Report) Ratios() []Ratio {
	base := cellFilter{prefetch: first(r.Config.Prefetch), rate: firstInt(r.Config.Rates), forks: maxInt(r.Config.Forks)}
	find := func(round, size int, strategy, backend, temp string) *Cell {
		f := base
		f.size, f.strategy, f.backend, f.temp, f.run = size, strategy, backend, temp, round
		return r.find(f)
	}
	var out []Ratio
	add := func(name string, a, b float64) {
		if a > 0 && b > 0 {
			out = append(out, Ratio{name, a / b})
		}
	}
	// per is one ratio of cells: value gives its two sides in a round.
	per := func(name string, value func(round int) (a, b float64, ok bool)) {
		out = append(out, r.roundRatios(name, value)...)
	}
	// cells gives a ratio's two cells in a round, and side their values.
	cells := func(cells func(round int) (a, b *Cell), side func(*Cell) float64) func(int) (float64, float64, bool) {
		return func(round int) (float64, float64, bool) {
			a, b := cells(round)
			if a == nil || b == nil {
				return 0, 0, false
			}
			return both(side(a), side(b))
		}
	}
	// serial is the first daemon's serial forks of size and strategy (a
	// report from before every daemon timed them has only those, unnamed).
	serial := func(size int, strategy string) *SerialFork {
		for i := range r.Serial {
			if s := &r.Serial[i]; s.SizeMiB == size && s.Strategy == strategy && s.Fork.N > 0 && s.Temperature == "" && (s.Prefetch == "" || s.Prefetch == base.prefetch) {
				return s
			}
		}
		return nil
	}
	sizes := append([]int(nil), r.Config.SizesMiB...)
	sort.Ints(sizes)
	for _, size := range sizes {
		// The fork budgets, per daemon: a serial fork within 5x of
		// link()+fsync(dir), a burst's fork p50 within 3x of a serial fork.
		// With one daemon per size the names say no daemon.
		for i := range r.Serial {
			h := &r.Serial[i]
			if h.SizeMiB != size || h.Strategy != StrategyHardlink || h.Fork.N == 0 {
				continue
			}
			pf, at, colon := h.Prefetch, fmt.Sprintf("%d MiB", size), ""
			if pf == "" {
				pf = base.prefetch
			} else if len(r.Config.Prefetch) > 1 {
				at, colon = at+" "+pf, ":"
			}
			burst := func(be, temp string, round int) *Cell {
				f := base
				f.size, f.strategy, f.prefetch, f.backend, f.temp, f.run = size, StrategyHardlink, pf, be, temp, round
				return r.find(f)
			}
			if h.Temperature == Cold {
				// Cold bursts against cold serial forks, like for like: each
				// call and each fork made right after the caches were dropped.
				for _, be := range r.Config.Backends {
					per(fmt.Sprintf("%s %s cold: burst fork p50 / cold serial fork p50 (like for like)", at, be), func(k int) (float64, float64, bool) {
						if c := burst(be, Cold, k); c != nil {
							return both(float64(c.Fork.P50), float64(h.Fork.P50))
						}
						return 0, 0, false
					})
					if r.Config.Batch {
						per(fmt.Sprintf("%s %s cold: one batch call of the burst's forks, p50 / cold serial fork p50 (like for like)", at, be), func(k int) (float64, float64, bool) {
							if c := burst(be, Cold, k); c != nil && c.Batch != nil && c.Batch.Err == "" && c.Batch.Call > 0 {
								return both(float64(c.Batch.Call), float64(h.Fork.P50))
							}
							return 0, 0, false
						})
					}
				}
				continue
			}
			add(fmt.Sprintf("%s%s serial fork p50 / link+fsync floor p50 (budget 5x)", at, colon), float64(h.Fork.P50), float64(h.Floor.P50))
			for _, be := range r.Config.Backends {
				for _, temp := range r.Config.Temperatures {
					burst := func(round int) *Cell { return burst(be, temp, round) }
					per(fmt.Sprintf("%s %s %s: burst fork p50 / serial fork p50 (budget 3x)", at, be, temp), func(k int) (float64, float64, bool) {
						if c := burst(k); c != nil {
							return both(float64(c.Fork.P50), float64(h.Fork.P50))
						}
						return 0, 0, false
					})
					if r.Config.Batch {
						per(fmt.Sprintf("%s %s %s: one batch call of the burst's forks, p50 / serial fork p50 (budget 3x)", at, be, temp), func(k int) (float64, float64, bool) {
							if c := burst(k); c != nil && c.Batch != nil && c.Batch.Err == "" && c.Batch.Call > 0 {
								return both(float64(c.Batch.Call), float64(h.Fork.P50))
							}
							return 0, 0, false
						})
					}
					// What the host's CPUs allow that ratio: the burst's CPU
					// per fork, for half its forks, over every CPU.
					per(fmt.Sprintf("%s %s %s: burst p50 CPU floor (half its forks' CPU / %d CPUs) / serial fork p50", at, be, temp, max(r.Machine.CPUs, 1)), func(k int) (float64, float64, bool) {
						if c := burst(k); c != nil && c.ForkCPU != nil {
							return both(float64(c.ForkCPU.BurstFloor(c.Forks, r.Machine.CPUs)), float64(h.Fork.P50))
						}
						return 0, 0, false
					})
				}
			}
		}
		// Each build's serial fork against the first build's, measured in
		// the same run, their forks taking turns.
		for i := range r.Serial {
			s := &r.Serial[i]
			if s.SizeMiB != size {
				continue
			}
			if b := r.serialBase(s); b != nil && b != s {
				add(fmt.Sprintf("%d MiB %s prefetch %s: serial fork p50 %s/%s", size, s.Strategy, PrefetchSetting(s.Prefetch), s.Build, b.Build),
					float64(s.Fork.P50), float64(b.Fork.P50))
			}
		}
		if h := serial(size, StrategyHardlink); h != nil {
			for _, other := range []string{StrategyCopy, StrategyReflink} {
				if o := serial(size, other); o != nil {
					add(fmt.Sprintf("%d MiB serial fork p50: %s/hardlink", size, other), float64(o.Fork.P50), float64(h.Fork.P50))
				}
			}
		}
		for _, be := range r.Config.Backends {
			for _, temp := range r.Config.Temperatures {
				for _, other := range []string{StrategyCopy, StrategyReflink} {
					pair := func(k int) (*Cell, *Cell) {
						return find(k, size, other, be, temp), find(k, size, StrategyHardlink, be, temp)
					}
					per(fmt.Sprintf("%d MiB %s %s: %s/hardlink fork p50", size, be, temp, other), cells(pair, func(c *Cell) float64 { return float64(c.Fork.P50) }))
					per(fmt.Sprintf("%d MiB %s %s: %s/hardlink restore+touch p50", size, be, temp, other),
						cells(pair, func(c *Cell) float64 { return float64(c.Restore.P50 + c.Touch.P50) }))
				}
			}
			per(fmt.Sprintf("%d MiB %s hardlink: cold/warm touch p50", size, be), cells(func(k int) (*Cell, *Cell) {
				return find(k, size, StrategyHardlink, be, Cold), find(k, size, StrategyHardlink, be, Warm)
			}, func(c *Cell) float64 { return float64(c.Touch.P50) }))
		}
		for _, temp := range r.Config.Temperatures {
			pair := func(k int) (*Cell, *Cell) {
				return find(k, size, StrategyHardlink, "uffd", temp), find(k, size, StrategyHardlink, "file", temp)
			}
			per(fmt.Sprintf("%d MiB hardlink %s: uffd/file PSS", size, temp), cells(pair, func(c *Cell) float64 { return float64(c.Memory.Pss) }))
			per(fmt.Sprintf("%d MiB hardlink %s: uffd/file restore p50", size, temp), cells(pair, func(c *Cell) float64 { return float64(c.Restore.P50) }))
		}
	}
	out = append(out, r.prefetchRatios()...)
	if len(sizes) > 1 {
		lo, hi := sizes[0], sizes[len(sizes)-1]
		for _, st := range r.Config.Strategies {
			if a, b := serial(hi, st), serial(lo, st); a != nil && b != nil {
				add(fmt.Sprintf("%s serial fork p50: %d/%d MiB", st, hi, lo), float64(a.Fork.P50), float64(b.Fork.P50))
			}
		}
		for _, be := range r.Config.Backends {
			for _, temp := range r.Config.Temperatures {
				per(fmt.Sprintf("hardlink %s %s: %d/%d MiB fork p50", be, temp, hi, lo), cells(func(k int) (*Cell, *Cell) {
					return find(k, hi, StrategyHardlink, be, temp), find(k, lo, StrategyHardlink, be, temp)
				}, func(c *Cell) float64 { return float64(c.Fork.P50) }))
			}
		}
	}
	return out
}

// serialBase is the row s is compared with when builds are compared: the
// first build's serial forks of the same size, strategy and prefetch
// setting (s itself when s is the first build's), or nil (no builds, or
// the first build's forks did not run).
func (r *Report) serialBase(s *SerialFork) *SerialFork {
	if len(r.Config.Builds) < 2 || s.Build == "" {
		return nil
	}
	for i := range r.Serial {
		b := &r.Serial[i]
		if b.Build == r.Config.Builds[0] && b.SizeMiB == s.SizeMiB && b.Strategy == s.Strategy && b.Temperature == s.Temperature &&
			PrefetchSetting(b.Prefetch) == PrefetchSetting(s.Prefetch) && b.Fork.N > 0 {
			return b
		}
	}
	return nil
}

func durStr(d time.Duration) string {
	switch {
	case d == 0:
		return "-"
	case d < time.Millisecond:
		return fmt.Sprintf("%dµs", d.Microseconds())
	case d < 10*time.Second:
		return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
	default:
		return fmt.Sprintf("%.1fs", d.Seconds())
	}
}

func bytesStr(b int64) string {
	switch {
	case b == -1:
		return "?" // unknown
	case b < 0:
		return "-" + bytesStr(-b)
	case b < 1<<10:
		return fmt.Sprintf("%dB", b)
	case b < 1<<20:
		return fmt.Sprintf("%.0fK", float64(b)/(1<<10))
	case b < 1<<30:
		return fmt.Sprintf("%.1fM", float64(b)/(1<<20))
	default:
		return fmt.Sprintf("%.2fG", float64(b)/(1<<30))
	}
}

// modesStr is the fork_mode of the forks: one word when they agree.
func modesStr(m map[string]int) string {
	if len(m) == 1 {
		for k := range m {
			return k
		}
	}
	return checksStr(m)
}

// checksStr is "ok" when every fork's memory_check was ok, else the counts.
func checksStr(m map[string]int) string {
	if len(m) == 0 {
		return "-"
	}
	if len(m) == 1 && m["ok"] > 0 {
		return "ok"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s×%d", truncateStr(k, 40), m[k]))
	}
	return strings.Join(parts, ",")
}

func truncateStr(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
