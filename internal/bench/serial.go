package bench

import (
	"context"
	"fmt"
	"strings"
)

// SerialRound is how many serial forks one daemon makes before the next
// daemon takes its turn. Within a round a fork follows its own daemon's
// previous fork, as in a run with one daemon; the rounds are short (a few
// fork/delete pairs, well under a second), so whatever loads the machine
// over seconds weighs on every daemon's forks alike.
const SerialRound = 5

// serialSeries is one daemon's serial forks.
type serialSeries struct {
	d    *daemon
	par  *parent // nil when no parent could be made (sf.Error says why)
	sf   SerialFork
	cpu  *cpuMeter
	cold bool // each fork right after the caches are dropped (sf.Temperature)
}

// serialForks times cfg.SerialForks forks to Standby on each daemon of ds
// (srcs[i] is ds[i]'s source), one fork at a time, each deleted before the
// next: the fork's own cost, without a burst's queueing. Each fork is
// preceded by a floor sample (link+fsync on the same filesystem). With
// several daemons (builds and prefetch settings compared side by side) the
// daemons take turns in rounds of SerialRound forks, so a build's serial
// fork can be compared with another's measured in the same run on the same
// machine. It returns one SerialFork per daemon, in the order of ds; a
// daemon whose fork fails stops there (its Error says why) and the others
// go on. A run with cold bursts that drops the caches for them
// (Config.coldSerial) then times the same number of cold serial forks per
// daemon, each right after a drop, as its cold bursts' batch calls are, and
// returns those rows after the warm ones.
func (r *runner) serialForks(ctx context.Context, ds []*daemon, srcs []*source, size int) []SerialFork {
	series := make([]*serialSeries, len(ds))
	names := make([]string, len(ds))
	for i, d := range ds {
		s := &serialSeries{d: d, sf: SerialFork{SizeMiB: size, Strategy: d.v.Strategy, Prefetch: d.v.Prefetch, Build: BuildOf(d.v.Prefetch),
			Samples: &SerialSamples{}}, cpu: newCPUMeter(d.pid)}
		series[i], names[i] = s, d.v.Prefetch
		par, err := r.freshParent(ctx, d, srcs[i])
		if err != nil {
			s.sf.Error = err.Error()
			continue
		}
		s.par = &par
		defer par.release(ctx, r, d)
	}
	if r.cfg.coldSerial() {
		for _, s := range series[:len(ds)] {
			c := *s
			c.sf.Temperature, c.sf.Samples, c.cpu, c.cold = Cold, &SerialSamples{}, newCPUMeter(s.d.pid), true
			series = append(series, &c)
		}
	}
	out := func() []SerialFork {
		sfs := make([]SerialFork, len(series))
		for i, s := range series {
			s.sf.Fork, s.sf.Floor = Summarize(s.sf.Samples.Fork), Summarize(s.sf.Samples.Floor)
			s.sf.ForkCPU = s.cpu.perFork()
			sfs[i] = s.sf
		}
		return sfs
	}
	floor, err := newFloorProbe(r.target.Dir)
	if err != nil {
		for _, s := range series {
			s.sf.Error = err.Error()
		}
		return out()
	}
	defer floor.Close()
	if len(ds) == 1 {
		r.progress(fmt.Sprintf("%d MiB %s: %d forks, one at a time, each after one link+fsync floor sample", size, ds[0].v, r.cfg.SerialForks))
	} else {
		r.progress(fmt.Sprintf("%d MiB %s: %d forks of each of %s, one at a time, the daemons taking turns every %d, each fork after one link+fsync floor sample",
			size, ds[0].v.Strategy, r.cfg.SerialForks, strings.Join(names, ", "), SerialRound))
	}
	r.settle()
	warm := series[:len(ds)]
	alternate(len(warm), r.cfg.SerialForks, SerialRound, func(i int) bool {
		return r.serialFork(ctx, warm[i], floor)
	})
	if cold := series[len(ds):]; len(cold) > 0 {
		r.progress(fmt.Sprintf("%d MiB %s: %d cold forks of each daemon, one at a time, each right after the caches are dropped", size, ds[0].v.Strategy, r.cfg.SerialForks))
		alternate(len(cold), r.cfg.SerialForks, SerialRound, func(i int) bool {
			return r.serialFork(ctx, cold[i], floor)
		})
	}
	return out()
}

// serialFork takes one floor sample and times one fork of s's daemon,
// then deletes the fork. It returns false when s can make no more forks.
// Floor and fork samples alternate, so whatever else loads the disk weighs
// on both alike.
func (r *runner) serialFork(ctx context.Context, s *serialSeries, floor *floorProbe) bool {
	if s.par == nil || s.sf.Error != "" {
		return false
	}
	if s.cold {
		if err := s.d.dropCaches(); err != nil {
			s.sf.Error = err.Error()
			return false
		}
	}
	f, err := floor.sample()
	if err != nil {
		s.sf.Error = err.Error()
		return false
	}
	s.cpu.start()
	res := r.forkOne(ctx, s.d, *s.par, r.name("serial"))
	s.cpu.stop(1)
	if res.err != nil {
		s.sf.Error = res.err.Error()
		return false
	}
	s.sf.Samples.Floor = append(s.sf.Samples.Floor, f)
	s.sf.Samples.Fork = append(s.sf.Samples.Fork, res.fork)
	r.deleteInstance(ctx, s.d, res.id)
	return true
}

// alternate runs step(i) up to n times for each of k series, the series
// taking turns in rounds of up to round steps each (0, 0, 1, 1, 0, 0, ...
// for k=2, round=2). A step that returns false ends its series; the others
// go on.
func alternate(k, n, round int, step func(i int) bool) {
	done, made := make([]bool, k), make([]int, k)
	for {
		active := false
		for i := range k {
			for j := 0; j < round && !done[i] && made[i] < n; j++ {
				active = true
				if step(i) {
					made[i]++
				} else {
					done[i] = true
				}
			}
		}
		if !active {
			return
		}
	}
}
