package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/daemonproc"
)

// ListOptions configure the list-latency benchmark (`forkd bench list`):
// how long GET /instances takes as the number of instances grows, with a
// tenth of them Running and one Running VMM stopped by SIGSTOP (a hung VMM
// must cost a list nothing).
type ListOptions struct {
	// Binaries are the forkd binaries whose daemons are measured, in order,
	// each by its label ("before=/tmp/forkd-old"). One run measures them all,
	// so their figures compare.
	Binaries []LabeledBinary
	// Sizes are the instance counts measured, ascending (10, 100, 500).
	Sizes []int
	// RunningPct is the share of instances that are Running (10); at least
	// two run, one of them SIGSTOPped.
	RunningPct int
	// Samples is how many timed lists are taken per size (200); MaxTime
	// caps the sampling time per size (60 s), with at least MinSamples (5).
	Samples, MinSamples int
	MaxTime             time.Duration
	// MemoryMiB is the guests' RAM (16: the smallest); their workload is
	// slowed to a trickle so 50 of them fit two cores.
	MemoryMiB int
	// Dir holds the run's data dirs (default $TMPDIR).
	Dir string
}

// LabeledBinary is one daemon binary to measure.
type LabeledBinary struct {
	Label, Path string
}

// ListCell is one binary at one size.
type ListCell struct {
	Binary    string        `json:"binary"`
	Instances int           `json:"instances"`
	Running   int           `json:"running"`
	Stopped   int           `json:"sigstopped"`
	Latency   Summary       `json:"latency"`
	P99       time.Duration `json:"p99_ns"`
	// DaemonCPU is the CPU time the daemon spent per list (all its
	// threads, so also whatever its background work did meanwhile), and
	// RunQueueWait the time its threads waited for a CPU meanwhile: on a
	// loaded host a slow list with little CPU waited for the machine, not
	// for forkd.
	DaemonCPU    Summary       `json:"daemon_cpu"`
	DaemonCPUP99 time.Duration `json:"daemon_cpu_p99_ns"`
	RunQueueWait Summary       `json:"run_queue_wait"`
}

// ListReport is the run.
type ListReport struct {
	Cells []ListCell `json:"cells"`
}

func (o *ListOptions) defaults() error {
	if len(o.Binaries) == 0 {
		return errors.New("list bench: no binary to measure")
	}
	if len(o.Sizes) == 0 {
		o.Sizes = []int{10, 100, 500}
	}
	if !slices.IsSorted(o.Sizes) || o.Sizes[0] < 2 {
		return fmt.Errorf("list bench: sizes %v: want ascending counts of at least 2", o.Sizes)
	}
	if o.RunningPct <= 0 {
		o.RunningPct = 10
	}
	if o.Samples <= 0 {
		o.Samples = 200
	}
	if o.MinSamples <= 0 {
		o.MinSamples = 5
	}
	if o.MaxTime <= 0 {
		o.MaxTime = 60 * time.Second
	}
	if o.MemoryMiB <= 0 {
		o.MemoryMiB = 16
	}
	return nil
}

// listBootArgs keep the guests nearly idle: 50 of them share two cores.
const listBootArgs = "forkd.ws_mib=1 forkd.rate=10 forkd.write_pct=10"

// ListLatency runs the benchmark: for each binary a daemon on a fresh data
// dir, grown to each size in turn (forks of one Standby VM, a tenth of them
// restored to Running, the first Running VMM SIGSTOPped), and at each size
// GET /instances timed back to back. progress gets a line per step.
func ListLatency(ctx context.Context, o ListOptions, progress func(string)) (*ListReport, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	if progress == nil {
		progress = func(string) {}
	}
	rep := &ListReport{}
	for _, b := range o.Binaries {
		cells, err := listOneBinary(ctx, o, b, progress)
		rep.Cells = append(rep.Cells, cells...)
		if err != nil {
			return rep, fmt.Errorf("list bench %s: %w", b.Label, err)
		}
	}
	return rep, nil
}

func listOneBinary(ctx context.Context, o ListOptions, b LabeledBinary, progress func(string)) (cells []ListCell, err error) {
	dir, err := os.MkdirTemp(o.Dir, "fl")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	d, err := daemonproc.Start(ctx, daemonproc.Spec{
		Binary: b.Path, DataDir: filepath.Join(dir, "d"), LogPath: filepath.Join(dir, "daemon.log"),
		Args: []string{"--vmm-binary", b.Path},
	})
	if err != nil {
		return nil, err
	}
	stopped := 0
	defer func() {
		if stopped > 0 {
			syscall.Kill(stopped, syscall.SIGCONT)
		}
		tctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		err = errors.Join(err, d.Teardown(tctx, time.Minute))
	}()
	c := d.Client
	progress(fmt.Sprintf("%s: daemon pid %d (%s)", b.Label, d.Pid(), b.Path))
	if _, err := c.CreateInstance(ctx, api.CreateInstanceRequest{Name: "proto", MemoryMiB: o.MemoryMiB, BootArgs: listBootArgs}); err != nil {
		return nil, err
	}
	if _, err := c.Action(ctx, "proto", "standby", api.ActionRequest{}); err != nil {
		return nil, err
	}
	have, running := 1, 0
	for _, n := range o.Sizes {
		wantRunning := max(2, n*o.RunningPct/100)
		for ; have < n; have++ {
			req := api.ForkRequest{Name: fmt.Sprintf("vm-%d", have)}
			if running < wantRunning {
				req.TargetState, req.RestoreBackend = api.StateRunning, api.BackendFile
			}
			in, err := c.ForkInstance(ctx, "proto", req)
			if err != nil {
				return cells, fmt.Errorf("fork %s: %w", req.Name, err)
			}
			if req.TargetState == api.StateRunning {
				running++
				if stopped == 0 {
					if err := syscall.Kill(in.Pid, syscall.SIGSTOP); err != nil {
						return cells, fmt.Errorf("SIGSTOP VMM %d: %w", in.Pid, err)
					}
					stopped = in.Pid
				}
			}
		}
		progress(fmt.Sprintf("%s: %d instances (%d Running, VMM %d stopped); timing GET /instances", b.Label, n, running, stopped))
		lat, cpu, wait, err := timeLists(ctx, c, d.Pid(), n, o)
		if err != nil {
			return cells, err
		}
		cell := ListCell{Binary: b.Label, Instances: n, Running: running, Stopped: 1, Latency: Summarize(lat),
			DaemonCPU: Summarize(cpu), RunQueueWait: Summarize(wait)}
		cell.P99, cell.DaemonCPUP99 = p99(lat), p99(cpu)
		cells = append(cells, cell)
		progress(fmt.Sprintf("%s: %d instances: p50 %v p99 %v, daemon CPU per list p50 %v p99 %v (%d samples)",
			b.Label, n, cell.Latency.P50, cell.P99, cell.DaemonCPU.P50, cell.DaemonCPUP99, len(lat)))
	}
	return cells, nil
}

// timeLists times GET /instances back to back: o.Samples of them, or as
// many as fit o.MaxTime (never fewer than o.MinSamples). Each must list
// all n instances. Beside each list's latency it returns the CPU time the
// daemon (pid) used meanwhile and the time its threads waited for a CPU.
func timeLists(ctx context.Context, c *api.Client, pid, n int, o ListOptions) (lat, cpu, wait []time.Duration, err error) {
	start := time.Now()
	for len(lat) < o.Samples && (len(lat) < o.MinSamples || time.Since(start) < o.MaxTime) {
		before, err := ReadSchedTimes(pid)
		if err != nil {
			return lat, cpu, wait, fmt.Errorf("daemon pid %d: %w", pid, err)
		}
		t := time.Now()
		list, err := c.ListInstances(ctx)
		if err != nil {
			return lat, cpu, wait, fmt.Errorf("list instances: %w", err)
		}
		lat = append(lat, time.Since(t))
		after, err := ReadSchedTimes(pid)
		if err != nil {
			return lat, cpu, wait, fmt.Errorf("daemon pid %d: %w", pid, err)
		}
		cpu = append(cpu, after.CPU-before.CPU)
		wait = append(wait, after.RunQueueWait-before.RunQueueWait)
		if len(list) != n {
			return lat, cpu, wait, fmt.Errorf("list instances: %d, want %d", len(list), n)
		}
	}
	return lat, cpu, wait, nil
}

func p99(sample []time.Duration) time.Duration {
	s := slices.Clone(sample)
	slices.Sort(s)
	return percentile(s, 99)
}

// WriteTable prints the cells side by side, with each binary's p99 as a
// ratio of the first binary's at the same size.
func (r *ListReport) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "binary\tinstances\trunning\tsigstopped\tsamples\tp50\tp99\tmax\tp99 vs first\tdaemon CPU p50\tdaemon CPU p99\tCPU wait p50\t")
	first := map[int]time.Duration{}
	for _, c := range r.Cells {
		if _, ok := first[c.Instances]; !ok {
			first[c.Instances] = c.P99
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%s\t%s\t%s\t%.3gx\t%s\t%s\t%s\t\n", c.Binary, c.Instances, c.Running, c.Stopped, c.Latency.N,
			fmtMs(c.Latency.P50), fmtMs(c.P99), fmtMs(c.Latency.Max), ratio(float64(c.P99), float64(first[c.Instances])),
			fmtMs(c.DaemonCPU.P50), fmtMs(c.DaemonCPUP99), fmtMs(c.RunQueueWait.P50))
	}
	return tw.Flush()
}

// WriteJSON writes the report as indented JSON.
func (r *ListReport) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

func fmtMs(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d.Microseconds())/1000) }
