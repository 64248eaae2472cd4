package bench

import (
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// The prefetch part of the report: time from the restore call to the
// working set read, disk reads, pager faults and waste, per prefetch
// setting, rate, burst size, backend and temperature; the budgets as ratios;
// and the runs of the differing workload with their spread.

// cellFilter selects a measured cell; zero fields match anything except
// workload, which defaults to WorkloadSame.
type cellFilter struct {
	size                              int
	strategy, prefetch, backend, temp string
	rate, forks                       int
	workload                          string
	run                               int
}

func (r *Report) find(f cellFilter) *Cell {
	if f.workload == "" {
		f.workload = WorkloadSame
	}
	for i := range r.Cells {
		c := &r.Cells[i]
		if c.Skipped != "" || c.Forks <= c.Failed {
			continue
		}
		if (f.size == 0 || c.SizeMiB == f.size) && (f.strategy == "" || c.Strategy == f.strategy) &&
			(f.prefetch == "" || c.Prefetch == f.prefetch) && (f.backend == "" || c.Backend == f.backend) &&
			(f.temp == "" || c.Temperature == f.temp) && (f.rate == 0 || c.Rate == f.rate) &&
			(f.forks == 0 || c.Forks == f.forks) && (c.Workload == f.workload || c.Workload == "" && f.workload == WorkloadSame) &&
			(f.run == 0 || c.Run == f.run) {
			return c
		}
	}
	return nil
}

func first(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}

func firstInt(s []int) int {
	if len(s) == 0 {
		return 0
	}
	return s[0]
}

func maxInt(s []int) int {
	if len(s) == 0 {
		return 0
	}
	return slices.Max(s)
}

// workloadStr is the workload column: the workload, and its run (a
// differing workload's run, a round of the same) when there are several.
func (c Cell) workloadStr() string {
	if c.Run > 0 {
		return fmt.Sprintf("%s#%d", c.Workload, c.Run)
	}
	return c.Workload
}

// writePrefetchTable writes the prefetch rows (only when prefetch is among
// the settings compared).
func (r *Report) writePrefetchTable(w io.Writer) error {
	if !slices.ContainsFunc(r.Config.Prefetch, func(pf string) bool { return PrefetchSetting(pf) == PrefetchAuto }) && r.Config.DiffersRuns == 0 {
		return nil
	}
	fmt.Fprintln(w, "\nprefetch (to ws: restore call to working set read, per fork; faults: pager faults over the burst; waste: wasted/prefetched pages)")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "size\tprefetch\trate\tworkload\tforks\tbackend\ttemp\tto ws p50\tp95\tdisk read\tfaults\trecorded\tprefetched\twaste\tmodes\t")
	for _, c := range r.Cells {
		if c.Skipped != "" || c.Strategy != StrategyHardlink {
			continue
		}
		faults := "-"
		if c.Pager != nil {
			faults = fmt.Sprint(c.Pager.Faults)
		}
		rec, pre, waste, modes := "-", "-", "-", "-"
		if p := c.PrefetchStats; p != nil {
			rec, pre = fmt.Sprint(p.PagesRecorded), fmt.Sprint(p.PagesPrefetched)
			if p.PagesPrefetched > 0 {
				waste = fmt.Sprintf("%.1f%%", p.WastePct())
			}
			modes = checksStr(p.Modes)
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n",
			c.SizeMiB, c.Prefetch, c.Rate, c.workloadStr(), c.Forks, c.Backend, c.Temperature,
			durStr(c.ToWorkingSet.P50), durStr(c.ToWorkingSet.P95), bytesStr(c.DiskReadBytes), faults, rec, pre, waste, modes)
	}
	return tw.Flush()
}

// writeRoundsTable writes, when the run had several rounds, each cell
// key's to-ws p50 in every round and the p50 of every fork of every round
// together.
func (r *Report) writeRoundsTable(w io.Writer) error {
	if r.Config.Rounds <= 1 {
		return nil
	}
	fmt.Fprintf(w, "\nto ws by round (p50 of each of the %d rounds, in order; all: p50 over every fork of every round)\n", r.Config.Rounds)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "size\tprefetch\trate\tforks\tbackend\ttemp\trounds\tall p50\t")
	var keys []cellKey
	byKey := map[cellKey][]*Cell{}
	for i := range r.Cells {
		c := &r.Cells[i]
		if c.Skipped != "" || c.Strategy != StrategyHardlink || c.Workload == WorkloadDiffers || c.Run == 0 {
			continue
		}
		k := cellKey{c.SizeMiB, c.Strategy, c.Prefetch, c.Rate, c.Forks, c.Backend, c.Temperature, c.Workload, 0}
		if _, seen := byKey[k]; !seen {
			keys = append(keys, k)
		}
		byKey[k] = append(byKey[k], c)
	}
	for _, k := range keys {
		var rounds []string
		var all []time.Duration
		for _, c := range byKey[k] {
			rounds = append(rounds, durStr(c.ToWorkingSet.P50))
			if c.Samples != nil {
				all = append(all, c.Samples.ToWorkingSet...)
			}
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%d\t%s\t%s\t%s\t%s\t\n", k.size, k.prefetch, k.rate, k.forks, k.backend, k.temp,
			strings.Join(rounds, " "), durStr(Summarize(all).P50))
	}
	return tw.Flush()
}

// prefetchRatios are the prefetch budgets, each within one run: for every
// size, rate and burst size, Uffd against File (budget ≤ 1.2), cold against
// warm (≤ 1.5), cold disk reads against the working set (≤ 1.2), waste
// (under 10%), each with prefetch auto and, where measured, off (the
// "before"); the speedup of prefetch; and the differing workload's cost
// per run, with the median and spread. With several rounds each budget is
// a ratio of two cells of one round, quoted as the median of the rounds
// and their spread (roundRatios).
func (r *Report) prefetchRatios() []Ratio {
	var out []Ratio
	toWS := func(c *Cell) float64 {
		if c == nil {
			return 0
		}
		return float64(c.ToWorkingSet.P50)
	}
	cpus := max(r.Machine.CPUs, 1)
	for _, size := range r.Config.SizesMiB {
		wsBytes := float64(r.Config.workingSetMiB(size)) * (1 << 20)
		for _, rate := range r.Config.Rates {
			for _, n := range r.Config.Forks {
				name := func(s string) string { return fmt.Sprintf("%d MiB rate %d, %d forks: %s", size, rate, n, s) }
				at := func(round int, pf, backend, temp string) *Cell {
					return r.find(cellFilter{size: size, strategy: StrategyHardlink, prefetch: pf, rate: rate, forks: n, backend: backend, temp: temp, run: round})
				}
				// per is one budget: value gives its two sides in a round,
				// and whether both were measured.
				per := func(label string, value func(round int) (a, b float64, ok bool)) {
					out = append(out, r.roundRatios(name(label), value)...)
				}
				for _, pf := range r.Config.Prefetch {
					for _, temp := range r.Config.Temperatures {
						for _, be := range []string{api.BackendUffd, BackendUffdHuge} {
							per(fmt.Sprintf("prefetch %s %s: %s/file to-ws p50", pf, temp, be), func(k int) (float64, float64, bool) {
								return both(toWS(at(k, pf, be, temp)), toWS(at(k, pf, api.BackendFile, temp)))
							})
							if n <= cpus {
								continue
							}
							// What the host's CPUs allow that ratio when the
							// burst's guests keep every CPU busy.
							per(fmt.Sprintf("prefetch %s %s: %s/file to-ws floor from the pager's CPU (file to-ws p50 + %d forks' pager CPU / %d CPUs, over file to-ws p50)", pf, temp, be, n, cpus), func(k int) (float64, float64, bool) {
								u, f := at(k, pf, be, temp), toWS(at(k, pf, api.BackendFile, temp))
								if u == nil || u.PagerCPU <= 0 || f <= 0 {
									return 0, 0, false
								}
								return f + float64(pagerFloor(u.PagerCPU, n, cpus)), f, true
							})
						}
					}
					for _, be := range r.Config.Backends {
						per(fmt.Sprintf("prefetch %s %s: cold/warm to-ws p50", pf, be), func(k int) (float64, float64, bool) {
							return both(toWS(at(k, pf, be, Cold)), toWS(at(k, pf, be, Warm)))
						})
						per(fmt.Sprintf("prefetch %s %s cold: disk read/working set", pf, be), func(k int) (float64, float64, bool) {
							if c := at(k, pf, be, Cold); c != nil {
								return both(float64(c.DiskReadBytes), wsBytes)
							}
							return 0, 0, false
						})
					}
				}
				for _, be := range r.Config.Backends {
					for _, temp := range r.Config.Temperatures {
						per(fmt.Sprintf("%s %s: prefetch auto/off to-ws p50", be, temp), func(k int) (float64, float64, bool) {
							return both(toWS(at(k, PrefetchAuto, be, temp)), toWS(at(k, PrefetchOff, be, temp)))
						})
						per(fmt.Sprintf("%s %s prefetch auto: waste (wasted/prefetched)", be, temp), func(k int) (float64, float64, bool) {
							if c := at(k, PrefetchAuto, be, temp); c != nil && c.PrefetchStats != nil && c.PrefetchStats.PagesPrefetched > 0 {
								return float64(c.PrefetchStats.PagesWasted), float64(c.PrefetchStats.PagesPrefetched), true // 0 wasted is a ratio of 0
							}
							return 0, 0, false
						})
					}
				}
			}
		}
		out = append(out, r.differsRatios(size)...)
	}
	return out
}

// pagerFloor is the time a burst of n Uffd forks spends on the pager's CPU,
// perFork each, at the least, when the guests keep all cpus busy: a Uffd
// fork reaches its working set no sooner than a File fork of the same run
// plus that, since the File forks' guests do the same work without it.
func pagerFloor(perFork time.Duration, n, cpus int) time.Duration {
	return time.Duration(n) * perFork / time.Duration(max(cpus, 1))
}

// roundRatios is one budget's ratio a/b, as value gives its sides in each
// round: the ratio itself with one round (round 0: reports without
// rounds); with several, the median and spread (max-min) of the rounds
// whose two sides were measured. Each ratio is of two cells of one round,
// measured minutes apart at most, which a noisy machine moves less than
// it moves one round against another.
func (r *Report) roundRatios(name string, value func(round int) (a, b float64, ok bool)) []Ratio {
	if r.Config.Rounds <= 1 {
		if a, b, ok := value(0); ok {
			return []Ratio{{name, a / b}}
		}
		return nil
	}
	var vals []float64
	for round := 1; round <= r.Config.Rounds; round++ {
		if a, b, ok := value(round); ok {
			vals = append(vals, a/b)
		}
	}
	if len(vals) == 0 {
		return nil
	}
	sort.Float64s(vals)
	return []Ratio{
		{fmt.Sprintf("%s, median of %d rounds", name, len(vals)), median(vals)},
		{fmt.Sprintf("%s, spread (max-min) of %d rounds", name, len(vals)), vals[len(vals)-1] - vals[0]},
	}
}

// both passes a ratio's sides on when both were measured (positive).
func both(a, b float64) (float64, float64, bool) { return a, b, a > 0 && b > 0 }

// median of sorted values.
func median(sorted []float64) float64 {
	n := len(sorted)
	if n%2 == 1 {
		return sorted[n/2]
	}
	return (sorted[n/2-1] + sorted[n/2]) / 2
}

// differsRatios is, per backend, the differing workload's prefetch
// auto/off time to working set in each run, and their median and spread.
func (r *Report) differsRatios(size int) []Ratio {
	var out []Ratio
	for _, be := range r.Config.Backends {
		var runs []float64
		for run := 1; run <= r.Config.DiffersRuns; run++ {
			on := r.find(cellFilter{size: size, prefetch: PrefetchAuto, backend: be, workload: WorkloadDiffers, run: run})
			off := r.find(cellFilter{size: size, prefetch: PrefetchOff, backend: be, workload: WorkloadDiffers, run: run})
			if on == nil || off == nil || off.ToWorkingSet.P50 == 0 {
				continue
			}
			v := float64(on.ToWorkingSet.P50) / float64(off.ToWorkingSet.P50)
			runs = append(runs, v)
			out = append(out, Ratio{fmt.Sprintf("%d MiB differing workload %s cold, run %d: prefetch auto/off to-ws p50", size, be, run), v})
		}
		if len(runs) > 0 {
			sort.Float64s(runs)
			out = append(out,
				Ratio{fmt.Sprintf("%d MiB differing workload %s cold: median of %d runs", size, be, len(runs)), median(runs)},
				Ratio{fmt.Sprintf("%d MiB differing workload %s cold: spread (max-min) of %d runs", size, be, len(runs)), runs[len(runs)-1] - runs[0]})
		}
	}
	return out
}
