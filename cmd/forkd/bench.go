package main

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/bench"
)

// newBenchForkBurstCommand is `forkd bench fork-burst` (internal/bench):
// a private daemon in a fresh data dir, N concurrent forks per strategy ×
// backend × temperature, a table or JSON report.
func newBenchForkBurstCommand() *cobra.Command {
	var (
		opt       bench.Options
		memoryMiB int
		vmmBinary string
		pfWindow  string
		builds    []string
		fsSize    string
		svgPath   string
		jsonPath  string
		profDir   string
	)
	cmd := &cobra.Command{
		Use:   "fork-burst",
		Short: "Measure fork fanout: strategies × restore backends, cold and warm",
		Long: `Start a private daemon in a fresh data dir, boot a source VM running the
emulator's self-checking workload, stand it by and snapshot it, then for every
fork strategy × restore backend run --forks concurrent forks to Running, cold
(new cache key; page cache dropped when root) and warm (same snapshot again).

Reports fork and restore latency p50/p95/max, the time until each fork's
workload has read its working set, pager hits/misses and backing bytes, disk
reads and allocation, PSS/RSS of the fork VMMs and every fork's memory_check.
Compare ratios within one run: absolute times on nested VMs are noise.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(opt.SizesMiB) == 0 {
				opt.SizesMiB = []int{memoryMiB}
			}
			if vmmBinary != "" {
				opt.DaemonArgs = append(opt.DaemonArgs, "--vmm-binary", vmmBinary)
			}
			for _, b := range builds {
				name, path, ok := strings.Cut(b, "=")
				if !ok || name == "" || path == "" {
					return fmt.Errorf("--binary %q: want NAME=PATH, e.g. before=/tmp/forkd-main", b)
				}
				if _, dup := opt.Binaries[name]; dup {
					return fmt.Errorf("--binary: build %q given twice", name)
				}
				if _, err := os.Stat(path); err != nil {
					return fmt.Errorf("--binary %s: %w", b, err)
				}
				if opt.Binaries == nil {
					opt.Binaries = map[string]string{}
				}
				opt.Binaries[name] = path
				opt.Builds = append(opt.Builds, name)
			}
			if pfWindow != "" {
				opt.DaemonArgs = append(opt.DaemonArgs, "--prefetch-window", pfWindow)
			}
			if profDir != "" {
				abs, err := filepath.Abs(profDir)
				if err != nil {
					return fmt.Errorf("--daemon-profile: %w", err)
				}
				opt.DaemonArgs = append(opt.DaemonArgs, "--profile", abs)
			}
			if fsSize != "" {
				n, err := api.ParseBytes(fsSize)
				if err != nil {
					return fmt.Errorf("--fs-size: %w", err)
				}
				opt.FSSize = n
			}
			format, _ := cmd.Flags().GetString("output")
			if format != "table" && format != "json" {
				return fmt.Errorf("--output %q: want table or json", format)
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, os.Interrupt)
			defer stop()
			progress := func(s string) { fmt.Fprintln(cmd.ErrOrStderr(), "bench:", s) }
			rep, err := bench.ForkBurst(ctx, opt, progress)
			if rep != nil {
				var werr error
				if format == "json" {
					werr = rep.WriteJSON(cmd.OutOrStdout())
				} else {
					werr = rep.WriteTable(cmd.OutOrStdout())
				}
				if err == nil {
					err = werr
				}
				if jsonPath != "" {
					if jerr := writeJSON(jsonPath, rep); jerr != nil && err == nil {
						err = jerr
					}
				}
				if svgPath != "" {
					if serr := writeSVG(svgPath, rep); serr != nil && err == nil {
						err = serr
					}
				}
			}
			return err
		},
	}
	f := cmd.Flags()
	f.IntSliceVar(&opt.Forks, "forks", []int{25}, "concurrent forks per burst; a list runs each, e.g. 1,25")
	f.IntVar(&memoryMiB, "memory-mib", 1024, "guest RAM of the source VM (MiB)")
	f.IntSliceVar(&opt.SizesMiB, "sizes", nil, "sweep guest RAM sizes in MiB, e.g. 256,1024,4096 (overrides --memory-mib)")
	f.IntVar(&opt.Vcpus, "vcpus", 1, "vCPUs of the source VM")
	f.IntVar(&opt.WorkingSetMiB, "ws-mib", 64, "working set of the guest workload (MiB; at most half the guest)")
	f.IntVar(&opt.WritePct, "write-pct", 20, "percent of workload steps that write their page")
	f.IntSliceVar(&opt.Rates, "rate", []int{20000}, "workload steps per second per VM (-1: unpaced; 20000 paces a page per 50 µs, so slower cold faults show in the touch time); a list runs each, e.g. 20000,-1")
	f.StringSliceVar(&opt.Prefetch, "prefetch", []string{bench.PrefetchOff, bench.PrefetchAuto}, "the daemons' prefetch settings to compare: off, auto")
	f.StringArrayVar(&builds, "binary", nil, "compare forkd builds side by side: NAME=PATH, repeated (e.g. --binary before=/tmp/forkd-main --binary after=./bin/forkd); every prefetch setting gets a daemon of each build, cells are named SETTING@NAME, and each daemon times its own serial forks, compared with the first build's")
	f.StringVar(&pfWindow, "prefetch-window", "", "the daemons' prefetch_window (default theirs, 5s): a burst's waste counts what its forks used within it, so give slow bursts a longer one")
	f.IntVar(&opt.Rounds, "rounds", 1, "run every burst this many times, the rounds taking turns (round 1 of every backend and daemon, then round 2...): each budget and every other ratio of bursts is then the median of the rounds' ratios, with their spread (a 1-fork burst is one sample)")
	f.IntVar(&opt.DiffersRuns, "differs", 0, "also run the case prefetch cannot help (forks whose workload differs from the recorded one) this many times, prefetch off and auto side by side (needs both)")
	f.StringSliceVar(&opt.Strategies, "strategies", []string{bench.StrategyHardlink, bench.StrategyReflink, bench.StrategyCopy},
		"fork strategies: hardlink (forkd), reflink, copy; ones the daemon cannot force are reported as skipped")
	f.StringSliceVar(&opt.Backends, "backends", []string{"file", "uffd"}, "restore backends: file, uffd, and uffd-2M (uffd restores of a source backed by 2 MiB pages: needs free pages in vm.nr_hugepages)")
	f.StringSliceVar(&opt.Temperatures, "temps", []string{bench.Cold, bench.Warm}, "cache temperatures: cold, warm")
	f.IntVar(&opt.SerialForks, "serial-forks", 10, fmt.Sprintf("forks timed one at a time per size, strategy and daemon (each prefetch setting of each --binary; the daemons take turns every %d forks), each after a link+fsync floor sample, apart from the bursts (-1: none)", bench.SerialRound))
	f.BoolVar(&opt.Batch, "batch", false, "also make each burst's forks by one batch call (POST .../forks), --batch-calls times before the concurrent calls, each deleted at once, and print the calls' p50 against a serial fork's")
	f.IntVar(&opt.BatchCalls, "batch-calls", 0, "with --batch: batch calls per burst, one after another, their p50 a batched fork's p50 (default 5)")
	f.StringVar(&opt.ForkFrom, "from", bench.FromSnapshot, "fork from a snapshot of the source or from the Standby source itself: snapshot, standby")
	f.IntVar(&opt.CopyMaxMiB, "copy-max-mib", 1024, "run the copy strategy only at sizes up to this (MiB; -1: all): a burst writes --forks × the guest's RAM")
	f.BoolVar(&opt.DropCaches, "drop-caches", os.Geteuid() == 0, "drop the host page cache and the dentry and inode caches before cold bursts (and before each of their batch calls), keeping the staged VMM program cached, and time cold serial forks, each after a drop, to set the cold bursts against (root)")
	f.StringVar(&opt.Dir, "data-dir", "", "make the run's data dir under this directory, on the filesystem to measure (default $TMPDIR)")
	f.StringVar(&opt.FS, "fs", "", "run on a fresh loopback filesystem: xfs, btrfs or ext4 (root)")
	f.StringVar(&fsSize, "fs-size", "64GiB", "size of the --fs image (sparse)")
	f.StringVar(&vmmBinary, "vmm-binary", "", `VMM for the daemon: "auto" or a path (default: the daemon's)`)
	f.BoolVar(&opt.Keep, "keep", false, "keep the run's data dir and logs (with --fs the data dir goes with the loopback filesystem: its logs are copied out, under --data-dir or $TMPDIR)")
	f.StringVar(&svgPath, "svg", "", "also draw the latency and PSS charts into this SVG file")
	f.StringVar(&jsonPath, "json", "", "also write the JSON report into this file (the table and the JSON of one run)")
	f.StringVar(&profDir, "daemon-profile", "", "have each daemon write a CPU profile and an execution trace of its whole run into this directory (forkd serve --profile)")
	return cmd
}

func writeJSON(path string, rep *bench.Report) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("--json: %w", err)
	}
	if err := rep.WriteJSON(f); err != nil {
		f.Close()
		return fmt.Errorf("--json %s: %w", path, err)
	}
	return f.Close()
}

func writeSVG(path string, rep *bench.Report) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("--svg: %w", err)
	}
	if err := rep.WriteSVG(f); err != nil {
		f.Close()
		return fmt.Errorf("--svg %s: %w", path, err)
	}
	return f.Close()
}

// newBenchListCommand is `forkd bench list` (internal/bench): GET /instances
// latency as instances grow, for one or more daemon binaries side by side.
func newBenchListCommand() *cobra.Command {
	var (
		opt      bench.ListOptions
		binaries []string
	)
	cmd := &cobra.Command{
		Use:   "list",
		Short: "Measure GET /instances latency at 10, 100 and 500 instances (a tenth Running, one VMM SIGSTOPped)",
		Long: `For each --binary, start a private daemon of it in a fresh data dir, grow it to
each --sizes count (forks of one Standby VM; --running-pct of them restored to
Running, and the first Running VMM stopped with SIGSTOP, as a hung VMM), and
time GET /instances back to back. Reports p50, p99 and max per binary and
size, each p99 as a ratio of the first binary's, and the daemon's CPU time
per list with the time its threads waited for a CPU (on a loaded host, a
slow list that used little CPU waited for the machine): measure the code before
and after a change in one run (build the old one with a name starting with
"forkd", which the daemon takes for the emulator).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(binaries) == 0 {
				exe, err := os.Executable()
				if err != nil {
					return err
				}
				binaries = []string{"this=" + exe}
			}
			for _, b := range binaries {
				label, path, ok := strings.Cut(b, "=")
				if !ok || label == "" || path == "" {
					return fmt.Errorf("--binary %q: want LABEL=PATH", b)
				}
				opt.Binaries = append(opt.Binaries, bench.LabeledBinary{Label: label, Path: path})
			}
			format, _ := cmd.Flags().GetString("output")
			if format != "table" && format != "json" {
				return fmt.Errorf("--output %q: want table or json", format)
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, os.Interrupt)
			defer stop()
			rep, err := bench.ListLatency(ctx, opt, func(s string) { fmt.Fprintln(cmd.ErrOrStderr(), "bench:", s) })
			if rep != nil {
				var werr error
				if format == "json" {
					werr = rep.WriteJSON(cmd.OutOrStdout())
				} else {
					werr = rep.WriteTable(cmd.OutOrStdout())
				}
				err = errors.Join(err, werr)
			}
			return err
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&binaries, "binary", nil, "LABEL=PATH of a forkd binary to measure (repeat to compare; default this binary)")
	f.IntSliceVar(&opt.Sizes, "sizes", []int{10, 100, 500}, "instance counts, ascending")
	f.IntVar(&opt.RunningPct, "running-pct", 10, "percent of the instances that are Running (at least 2; one is SIGSTOPped)")
	f.IntVar(&opt.Samples, "samples", 200, "timed lists per binary and size")
	f.DurationVar(&opt.MaxTime, "max-time", time.Minute, "stop sampling a size after this long (at least 5 samples)")
	f.IntVar(&opt.MemoryMiB, "memory-mib", 16, "guest RAM of the VMs (MiB)")
	f.StringVar(&opt.Dir, "data-dir", "", "make the run's data dirs under this directory (default $TMPDIR)")
	return cmd
}
