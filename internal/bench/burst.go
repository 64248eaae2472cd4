package bench

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/firecracker"
)

// maxCellErrors is how many fork errors a cell keeps.
const maxCellErrors = 5

// forkResult is one fork of a burst.
type forkResult struct {
	id                   string
	fork, restore, touch time.Duration
	touched              bool // the VMM reported its workload (emulator only)
	err                  error
}

// burst forks key.forks VMs from par concurrently; once every fork call
// returned, restores them all concurrently with key.backend and waits until
// each has touched its working set; then measures memory and the pager,
// waits for the forks' prefetch figures to be final, and deletes the forks.
// The two phases are apart so the fork latency is the fanout's own, not the
// restores' competing for the same CPUs and disk.
func (r *runner) burst(ctx context.Context, d *daemon, par parent, key cellKey) Cell {
	cell := key.cell()
	cell.MemoryChecks, cell.ForkModes = map[string]int{}, map[string]int{}
	n, size, backend := key.forks, key.size, key.backend
	r.progress(fmt.Sprintf("%d MiB %s rate %d %s %s %s: %d concurrent forks of %s", size, d.v, key.rate, backend, key.temp, key.workload, n, par))
	prefix := r.name("burst") + "-"
	svc := d.svc

	pagerBefore, pagerErr := r.pagerCounters(ctx, svc)
	pagerIOBefore, pagerIOErr := ReadProcIO(pagerBefore.Pid)
	pagerCPUBefore, pagerCPUErr := ReadSchedTimes(pagerBefore.Pid)
	readBefore, usedBefore := r.disk.ReadBytes(), r.disk.UsedBytes()

	cold := key.temp == Cold && r.cfg.DropCaches
	if r.cfg.Batch {
		cell.Batch = r.batch(ctx, d, par, n, cold)
		if cold { // the batch calls read back what the drop emptied
			if err := d.dropCaches(); err != nil {
				cell.Errors = append(cell.Errors, err.Error())
			}
		}
	}
	results := make([]forkResult, n)
	r.settle()
	cpu := newCPUMeter(d.pid)
	cpu.start()
	t0 := time.Now()
	concurrently(n, func(i int) { results[i] = r.forkOne(ctx, d, par, fmt.Sprintf("%s%d", prefix, i)) })
	cell.ForkWall = time.Since(t0)
	cpu.stop(n)
	cell.ForkCPU = cpu.perFork()
	concurrently(n, func(i int) {
		if results[i].err == nil {
			r.restoreOne(ctx, d, &results[i], backend, size)
		}
	})
	cell.Wall = time.Since(t0)

	readAfter, usedAfter := r.disk.ReadBytes(), r.disk.UsedBytes()
	cell.DiskReadBytes, cell.DiskUsedBytes = delta(readBefore, readAfter), delta(usedBefore, usedAfter)
	cell.PagerReadBytes = -1
	if pagerErr == nil {
		if after, err := r.pagerCounters(ctx, svc); err == nil {
			// A pager restarted during the burst (after a drain) counts from 0.
			if after.Pid != pagerBefore.Pid {
				pagerBefore, pagerCPUBefore, pagerCPUErr = PagerCounters{}, SchedTimes{}, nil
			}
			if cpu, err := ReadSchedTimes(after.Pid); err == nil && pagerCPUErr == nil && n > 0 {
				cell.PagerCPU = (cpu.CPU - pagerCPUBefore.CPU) / time.Duration(n)
			}
			dc := after.Sub(pagerBefore)
			cell.Pager = &dc
			// The pager reads backing pages for uffd restores: its own I/O
			// and memory (its page cache) belong to the burst's cost.
			if io, err := ReadProcIO(after.Pid); err == nil && pagerIOErr == nil && after.Pid == pagerBefore.Pid {
				cell.PagerReadBytes = io.ReadBytes - pagerIOBefore.ReadBytes
			} else if err == nil && after.Pid != pagerBefore.Pid {
				cell.PagerReadBytes = io.ReadBytes
			}
			if m, err := ReadMemUsage(after.Pid); err == nil {
				cell.PagerMemory = &m
			}
		}
	}

	var forks, restores, touches, toWS []time.Duration
	for _, res := range results {
		if res.err != nil {
			cell.Failed++
			if len(cell.Errors) < maxCellErrors {
				cell.Errors = append(cell.Errors, res.err.Error())
			}
			continue
		}
		forks, restores = append(forks, res.fork), append(restores, res.restore)
		if res.touched {
			touches = append(touches, res.touch)
			toWS = append(toWS, res.restore+res.touch)
		}
		r.measureFork(ctx, svc, res.id, &cell)
	}
	cell.Fork, cell.Restore, cell.Touch = Summarize(forks), Summarize(restores), Summarize(touches)
	cell.ToWorkingSet = Summarize(toWS)
	cell.Samples = &Samples{Fork: forks, Restore: restores, Touch: touches, ToWorkingSet: toWS}
	r.prefetchFigures(ctx, d, results, &cell)
	if why := unavailable(results); why != "" {
		// Not a failure of the strategy: this daemon cannot restore this way
		// (e.g. no pager in this build). Say so instead of a row of errors.
		c := key.cell()
		c.Skipped = why
		cell = c
	}
	r.deleteBurst(ctx, d, prefix)
	return cell
}

// batch makes n forks of par by one batch call, times it, and deletes them,
// cfg.BatchCalls times (each from a settled filesystem, as a serial fork
// is; cold: each right after the caches are dropped, as a cold serial fork
// is): a call's time is every one of its forks' latency, so the calls' p50
// is a batched fork's p50. The first failed call ends the series.
func (r *runner) batch(ctx context.Context, d *daemon, par parent, n int, cold bool) *BatchFork {
	b := &BatchFork{}
	cpu := newCPUMeter(d.pid)
	for range r.cfg.BatchCalls {
		name := r.name("batch")
		req := api.ForkBatchRequest{Name: name, Count: n, TargetState: api.StateStandby}
		if cold {
			if err := d.dropCaches(); err != nil {
				b.Err = err.Error()
				break
			}
		}
		r.settle()
		cpu.start()
		t0 := time.Now()
		var err error
		if par.snapshot {
			_, err = d.svc.ForkSnapshotBatch(ctx, par.id, req)
		} else {
			_, err = d.svc.ForkInstanceBatch(ctx, par.id, req)
		}
		took := time.Since(t0)
		if err == nil {
			cpu.stop(n) // the call's CPU only, not the deletes'
			b.Calls = append(b.Calls, took)
		}
		r.deleteBurst(ctx, d, name+"-")
		if err != nil {
			b.Err = err.Error()
			break
		}
	}
	b.Call = Summarize(b.Calls).P50
	b.CPU = cpu.perFork()
	return b
}

// prefetchFigures waits for each fork's prefetch figures to be final (the
// window closed) and sums them into the cell. A daemon with prefetch off
// reports none.
func (r *runner) prefetchFigures(ctx context.Context, d *daemon, results []forkResult, cell *Cell) {
	if PrefetchSetting(d.v.Prefetch) != PrefetchAuto {
		return
	}
	sum := &PrefetchSum{Modes: map[string]int{}}
	for _, res := range results {
		if res.err != nil {
			continue
		}
		p, err := r.waitPrefetch(ctx, d, res.id)
		if err != nil || p == nil {
			sum.Modes[fmt.Sprintf("unknown: %v", err)]++
			continue
		}
		sum.Modes[p.Mode]++
		sum.PagesRecorded = max(sum.PagesRecorded, p.PagesRecorded)
		sum.PagesPrefetched += p.PagesPrefetched
		sum.PagesWasted += p.PagesWasted
		if p.WorkingSetMs > 0 {
			sum.WorkingSet = append(sum.WorkingSet, time.Duration(p.WorkingSetMs)*time.Millisecond)
		}
	}
	cell.PrefetchStats = sum
}

// waitPrefetch polls an instance until its prefetch figures are final; it
// returns nil when the daemon reports none (prefetch off).
func (r *runner) waitPrefetch(ctx context.Context, d *daemon, id string) (*api.Prefetch, error) {
	deadline := time.Now().Add(3 * time.Minute)
	for {
		in, err := d.svc.GetInstance(ctx, id)
		if err != nil {
			return nil, err
		}
		if in.Prefetch == nil || in.Prefetch.Done {
			return in.Prefetch, nil
		}
		if time.Now().After(deadline) {
			return in.Prefetch, fmt.Errorf("instance %s: prefetch figures not final after 3 min: %+v", id, in.Prefetch)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// concurrently runs f(0..n-1) in n goroutines released together, and
// waits for them.
func concurrently(n int, f func(i int)) {
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			f(i)
		})
	}
	close(start)
	wg.Wait()
}

// forkOne forks par to Standby: the fanout the API promises to be zero-I/O.
func (r *runner) forkOne(ctx context.Context, d *daemon, par parent, name string) forkResult {
	t0 := time.Now()
	inst, err := par.fork(ctx, d.svc, api.ForkRequest{Name: name, TargetState: api.StateStandby})
	// The daemon's error message names the operation and the fork.
	return forkResult{id: inst.ID, fork: time.Since(t0), err: err}
}

// restoreOne restores a fork with backend and follows its workload until it
// has read as many pages as its working set holds.
func (r *runner) restoreOne(ctx context.Context, d *daemon, res *forkResult, backend string, size int) {
	t1 := time.Now()
	if _, err := d.svc.Action(ctx, res.id, "restore", api.ActionRequest{RestoreBackend: restoreBackend(backend)}); err != nil {
		res.err = err
		return
	}
	t2 := time.Now()
	res.restore = t2.Sub(t1)
	ok, err := r.waitWorkload(ctx, d, res.id, r.wsPages(size), 0)
	if err != nil {
		res.err = fmt.Errorf("fork %s workload: %w", res.id, err)
		return
	}
	res.touch, res.touched = time.Since(t2), ok
}

// waitWorkload waits until the workload of instance id has read pages more
// pages than when called (pages carry checksums: every read is verified).
// It returns false without waiting when the VMM does not report its
// workload (a real Firecracker), and an error on an integrity error. rate
// (the workload's pace, -1 unpaced, 0 unknown) spaces the polls.
func (r *runner) waitWorkload(ctx context.Context, d *daemon, id string, pages uint64, rate int) (bool, error) {
	g, err := d.layout.Guest(id)
	if err != nil {
		return false, err
	}
	c := firecracker.NewClient(g.VMMSock())
	defer c.Close()
	first, err := c.Guest(ctx)
	if errors.Is(err, firecracker.ErrNotSupported) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(ctx, r.cfg.TouchTimeout)
	defer cancel()
	tick := time.NewTicker(r.pollInterval(pages, rate))
	defer tick.Stop()
	for {
		st, err := c.Guest(ctx)
		if err != nil {
			return false, err
		}
		if st.IntegrityErrors > 0 {
			return false, fmt.Errorf("memory integrity error: %s", st.FirstIntegrityError)
		}
		if st.PagesRead-first.PagesRead >= pages {
			return true, nil
		}
		select {
		case <-ctx.Done():
			return false, fmt.Errorf("workload read %d of %d pages: %w", st.PagesRead-first.PagesRead, pages, ctx.Err())
		case <-tick.C:
		}
	}
}

// pollInterval spreads about 40 polls over the expected wait, so N forks
// polling do not load the VMMs they measure.
func (r *runner) pollInterval(pages uint64, rate int) time.Duration {
	if rate <= 0 {
		return 20 * time.Millisecond
	}
	expected := time.Duration(float64(pages) / float64(rate*r.cfg.Vcpus) * float64(time.Second))
	return min(max(expected/40, 20*time.Millisecond), 250*time.Millisecond)
}

// measureFork adds one fork's memory, reads, memory_check and fork_mode to
// the cell.
func (r *runner) measureFork(ctx context.Context, svc api.Service, id string, cell *Cell) {
	inst, err := svc.GetInstance(ctx, id)
	if err != nil {
		cell.MemoryChecks["get failed: "+err.Error()]++
		return
	}
	cell.MemoryChecks[inst.MemoryCheck]++
	cell.ForkModes[inst.ForkMode]++
	if inst.Pid <= 0 {
		return
	}
	if m, err := ReadMemUsage(inst.Pid); err == nil {
		cell.Memory = cell.Memory.Add(m)
	}
	if io, err := ReadProcIO(inst.Pid); err == nil {
		cell.VMMReadBytes += io.ReadBytes
	}
}

// unavailable returns the daemon's reason when every fork of a burst failed
// with api.ErrUnavailable, else "".
func unavailable(results []forkResult) string {
	for _, res := range results {
		if !errors.Is(res.err, api.ErrUnavailable) {
			return ""
		}
	}
	if len(results) == 0 {
		return ""
	}
	return "unavailable: " + results[0].err.Error()
}

// deleteBurst deletes every instance whose name starts with prefix, failed
// forks included.
func (r *runner) deleteBurst(ctx context.Context, d *daemon, prefix string) {
	ctx = context.WithoutCancel(ctx)
	list, err := d.svc.ListInstances(ctx)
	if err != nil {
		r.progress(fmt.Sprintf("list instances to clean up %s*: %v", prefix, err))
		return
	}
	var g errgroup.Group
	g.SetLimit(8)
	for _, inst := range list {
		if strings.HasPrefix(inst.Name, prefix) {
			g.Go(func() error { r.deleteInstance(ctx, d, inst.ID); return nil })
		}
	}
	_ = g.Wait()
}

// pagerCounters reads the pager's global counters through the daemon.
func (r *runner) pagerCounters(ctx context.Context, svc api.Service) (PagerCounters, error) {
	raw, err := svc.PagerStats(ctx)
	if err != nil {
		return PagerCounters{}, err
	}
	return ParsePagerStats(raw)
}

// delta is after-before, or -1 when either reading is unknown.
func delta(before, after int64) int64 {
	if before < 0 || after < 0 {
		return -1
	}
	return after - before
}
