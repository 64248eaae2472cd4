package bench

import (
	"fmt"
	"io"
	"slices"
	"sort"
	"text/tabwriter"

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

func (c Cell) workloadStr() string {
	if c.Workload == WorkloadDiffers {
		return fmt.Sprintf("differs#%d", c.Run)
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

// prefetchRatios are the prefetch budgets, each within one run: for every
// size, rate and burst size, Uffd against File (budget ≤ 1.2), cold against
// warm (≤ 1.5), cold disk reads against the working set (≤ 1.2), waste
// (under 10%), each with prefetch auto and, where measured, off (the
// "before"); the speedup of prefetch; and the differing workload's cost
// per run, with the median and spread.
func (r *Report) prefetchRatios() []Ratio {
	var out []Ratio
	add := func(name string, a, b float64) {
		if a > 0 && b > 0 {
			out = append(out, Ratio{name, a / b})
		}
	}
	toWS := func(c *Cell) float64 {
		if c == nil {
			return 0
		}
		return float64(c.ToWorkingSet.P50)
	}
	for _, size := range r.Config.SizesMiB {
		wsBytes := float64(r.Config.workingSetMiB(size)) * (1 << 20)
		for _, rate := range r.Config.Rates {
			for _, n := range r.Config.Forks {
				at := func(pf, backend, temp string) *Cell {
					return r.find(cellFilter{size: size, strategy: StrategyHardlink, prefetch: pf, rate: rate, forks: n, backend: backend, temp: temp})
				}
				name := func(s string) string { return fmt.Sprintf("%d MiB rate %d, %d forks: %s", size, rate, n, s) }
				for _, pf := range r.Config.Prefetch {
					for _, temp := range r.Config.Temperatures {
						add(name(fmt.Sprintf("prefetch %s %s: uffd/file to-ws p50", pf, temp)),
							toWS(at(pf, api.BackendUffd, temp)), toWS(at(pf, api.BackendFile, temp)))
						add(name(fmt.Sprintf("prefetch %s %s: uffd-2M/file to-ws p50", pf, temp)),
							toWS(at(pf, BackendUffdHuge, temp)), toWS(at(pf, api.BackendFile, temp)))
					}
					for _, be := range r.Config.Backends {
						add(name(fmt.Sprintf("prefetch %s %s: cold/warm to-ws p50", pf, be)),
							toWS(at(pf, be, Cold)), toWS(at(pf, be, Warm)))
						if c := at(pf, be, Cold); c != nil && c.DiskReadBytes > 0 {
							add(name(fmt.Sprintf("prefetch %s %s cold: disk read/working set", pf, be)), float64(c.DiskReadBytes), wsBytes)
						}
					}
				}
				for _, be := range r.Config.Backends {
					for _, temp := range r.Config.Temperatures {
						add(name(fmt.Sprintf("%s %s: prefetch auto/off to-ws p50", be, temp)),
							toWS(at(PrefetchAuto, be, temp)), toWS(at(PrefetchOff, be, temp)))
						if c := at(PrefetchAuto, be, temp); c != nil && c.PrefetchStats != nil && c.PrefetchStats.PagesPrefetched > 0 {
							out = append(out, Ratio{name(fmt.Sprintf("%s %s prefetch auto: waste (wasted/prefetched)", be, temp)),
								c.PrefetchStats.WastePct() / 100})
						}
					}
				}
			}
		}
		out = append(out, r.differsRatios(size)...)
	}
	return out
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
			med := runs[len(runs)/2]
			if len(runs)%2 == 0 {
				med = (runs[len(runs)/2-1] + runs[len(runs)/2]) / 2
			}
			out = append(out,
				Ratio{fmt.Sprintf("%d MiB differing workload %s cold: median of %d runs", size, be, len(runs)), med},
				Ratio{fmt.Sprintf("%d MiB differing workload %s cold: spread (max-min) of %d runs", size, be, len(runs)), runs[len(runs)-1] - runs[0]})
		}
	}
	return out
}
