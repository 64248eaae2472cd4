package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/api"
)

// demoOptions are the knobs of `forkd demo`.
type demoOptions struct {
	memoryMiB int
	forks     int
	keep      bool
	kernel    string
	vmm       string
	bootArgs  string
}

func newDemoCommand() *cobra.Command {
	o := demoOptions{}
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Start a throwaway daemon and drive it end to end: create, standby, fork burst, restore",
		Long: `Start a daemon of this binary in a temporary data dir, drive it through the API
and clean everything up (daemon, VMMs, pager, temp dir):

  create a VM, stand it by, fork it N times in a burst (hardlinked memory: no
  copy), delete the source, restore every fork, stand them all by again, and
  show fork latencies, fork modes, the pager's hit rate and each fork's memory
  integrity check.

It exits non-zero if any step fails. While the instance manager is not built
into this binary, it stops cleanly after the daemon checks.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runDemo(cmd.Context(), stdout(cmd), o)
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.memoryMiB, "memory", 512, "guest memory of the demo VM in MiB")
	f.IntVar(&o.forks, "forks", 10, "forks in the burst")
	f.BoolVar(&o.keep, "keep", false, "keep the temp data dir (and the daemon's log) for inspection")
	f.StringVar(&o.kernel, "kernel", "", "kernel image (default: a placeholder file, which the built-in emulator accepts)")
	f.StringVar(&o.vmm, "vmm-binary", "emulator", "the daemon's vmm_binary (emulator runs anywhere; use auto or a path with a real --kernel for Firecracker)")
	f.StringVar(&o.bootArgs, "boot-args", "forkd.ws_mib=32 forkd.write_pct=20 forkd.rate=2000 forkd.seed=7",
		"boot args of the demo VM (the emulator's guest workload reads forkd.*)")
	return cmd
}

// demo is one run of `forkd demo`.
type demo struct {
	out    io.Writer
	o      demoOptions
	dir    string // temp dir: data/, daemon.log, vmlinux
	data   string
	c      *api.Client
	daemon *exec.Cmd
	exited chan struct{} // closed when the daemon process has exited
	step   int
	mu     sync.Mutex  // guards pids
	pids   map[int]int // VMM pids seen in instance lists → count
}

const demoSteps = 10

func runDemo(ctx context.Context, out io.Writer, o demoOptions) (err error) {
	dir, err := os.MkdirTemp("", "forkd-demo-")
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	d := &demo{out: out, o: o, dir: dir, data: filepath.Join(dir, "data"), pids: map[int]int{}}
	defer func() {
		if cerr := d.cleanup(); cerr != nil && err == nil {
			err = cerr
		}
		if err != nil {
			err = fmt.Errorf("demo failed: %w", err)
		}
	}()
	return d.run(ctx)
}

func (d *demo) progress(format string, args ...any) {
	d.step++
	fmt.Fprintf(d.out, "[%2d/%d] %s\n", d.step, demoSteps, fmt.Sprintf(format, args...))
}

func (d *demo) detail(format string, args ...any) {
	fmt.Fprintf(d.out, "        %s\n", fmt.Sprintf(format, args...))
}

func (d *demo) run(ctx context.Context) error {
	start := time.Now()
	if err := d.startDaemon(ctx); err != nil {
		return err
	}

	h, err := d.c.Health(ctx)
	if err != nil {
		return fmt.Errorf("health: %w", err)
	}
	d.progress("daemon healthy: version %s, socket %s", h.Version, d.c.Host())

	list, err := d.c.ListInstances(ctx)
	if err != nil {
		return fmt.Errorf("list instances: %w", err)
	}
	d.progress("instances listed: %d (a fresh data dir)", len(list))

	kernel := d.o.kernel
	if kernel == "" {
		kernel = filepath.Join(d.dir, "vmlinux")
		if err := os.WriteFile(kernel, []byte("placeholder kernel: the emulator does not execute it\n"), 0o600); err != nil {
			return err
		}
	}
	t := time.Now()
	src, err := d.c.CreateInstance(ctx, api.CreateInstanceRequest{
		Name: "demo-src", Vcpus: 1, MemoryMiB: d.o.memoryMiB, Kernel: kernel, BootArgs: d.o.bootArgs,
	})
	if errors.Is(err, api.ErrNotImplemented) {
		d.progress("create instance: the daemon answered 501 not_implemented (%v)", err)
		d.detail("this build has no instance manager yet; the demo stops here, daemon checks passed")
		return nil
	}
	if err != nil {
		return fmt.Errorf("create instance: %w", err)
	}
	d.see(src)
	d.progress("created %s (%s): %d MiB, %s, VMM pid %d, in %s", src.Name, shortID(src.ID), src.MemoryMiB, src.State, src.Pid, ms(time.Since(t)))
	time.Sleep(time.Second) // let the guest workload dirty some memory

	t = time.Now()
	src, err = d.c.Action(ctx, src.ID, "standby", api.ActionRequest{})
	if err != nil {
		return fmt.Errorf("standby %s: %w", "demo-src", err)
	}
	d.progress("standby %s: %s in %s (cache key %s)", src.Name, src.State, ms(time.Since(t)), dash(src.SnapshotCacheKey))

	forks, lat, err := d.forkBurst(ctx, src)
	if err != nil {
		return err
	}
	modes := map[string]int{}
	for _, f := range forks {
		modes[f.ForkMode]++
	}
	d.progress("forked %d in a burst: p50 %s, max %s; modes %v", len(forks), ms(percentile(lat, 0.5)), ms(percentile(lat, 1)), modes)

	if err := d.c.DeleteInstance(ctx, src.ID); err != nil {
		return fmt.Errorf("delete source: %w", err)
	}
	for _, f := range forks {
		got, err := d.c.GetInstance(ctx, f.ID)
		if err != nil || got.State != api.StateStandby {
			return fmt.Errorf("fork %s after deleting its source: %+v, %v; want it intact in Standby", f.Name, got.State, err)
		}
	}
	d.progress("deleted the source; all %d forks intact (they hold the memory file's inode)", len(forks))

	// Half the forks restore through the pager, so its shared cache shows:
	// the first uffd sibling misses, the rest should hit. A build without
	// the pager restores them all from the file.
	_, perr := d.c.PagerStats(ctx)
	if perr != nil {
		d.detail("pager unavailable (%v): every fork restores with the file backend", perr)
	}
	restored, rlat, err := d.all(ctx, forks, "restore", func(i int) api.ActionRequest {
		if i%2 == 1 && perr == nil {
			return api.ActionRequest{RestoreBackend: api.BackendUffd}
		}
		return api.ActionRequest{RestoreBackend: api.BackendFile}
	})
	if err != nil {
		return err
	}
	backends := map[string]int{}
	for _, f := range restored {
		backends[f.RestoreBackend]++
		d.see(f)
	}
	d.progress("restored %d forks: p50 %s, max %s; backends %v", len(restored), ms(percentile(rlat, 0.5)), ms(percentile(rlat, 1)), backends)
	time.Sleep(time.Second) // let every fork's workload run and verify its pages

	parked, slat, err := d.all(ctx, restored, "standby", nil)
	if err != nil {
		return err
	}
	d.progress("stood %d forks by again (first standby of a fork unshares its memory): p50 %s, max %s",
		len(parked), ms(percentile(slat, 0.5)), ms(percentile(slat, 1)))

	var bad []string
	unknown := 0
	for _, f := range parked {
		switch f.MemoryCheck {
		case "ok":
		case "unknown", "":
			unknown++
		default:
			bad = append(bad, f.Name+": "+f.MemoryCheck)
		}
	}
	hit := "n/a"
	if raw, err := d.c.PagerStats(ctx); err == nil {
		if hits, misses, ok := hitsMisses(raw); ok && hits+misses > 0 {
			hit = fmt.Sprintf("%.1f%% (%d hits, %d misses)", 100*float64(hits)/float64(hits+misses), hits, misses)
		}
	}
	d.progress("memory checks: %d ok, %d unknown, %d failed; pager hit rate %s", len(parked)-unknown-len(bad), unknown, len(bad), hit)
	if len(bad) > 0 {
		return fmt.Errorf("memory integrity errors: %s", strings.Join(bad, "; "))
	}
	fmt.Fprintf(d.out, "demo passed in %s\n", time.Since(start).Round(time.Millisecond))
	return nil
}

// forkBurst forks src o.forks times concurrently.
func (d *demo) forkBurst(ctx context.Context, src api.Instance) ([]api.Instance, []time.Duration, error) {
	n := d.o.forks
	forks := make([]api.Instance, n)
	lat := make([]time.Duration, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.Now()
			forks[i], errs[i] = d.c.ForkInstance(ctx, src.ID, api.ForkRequest{Name: fmt.Sprintf("demo-fork-%d", i+1)})
			lat[i] = time.Since(t)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, nil, fmt.Errorf("fork burst: %w", err)
	}
	return forks, lat, nil
}

// all runs one action on every instance concurrently.
func (d *demo) all(ctx context.Context, list []api.Instance, action string, req func(i int) api.ActionRequest) ([]api.Instance, []time.Duration, error) {
	out := make([]api.Instance, len(list))
	lat := make([]time.Duration, len(list))
	errs := make([]error, len(list))
	var wg sync.WaitGroup
	for i, inst := range list {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.Now()
			var r api.ActionRequest
			if req != nil {
				r = req(i)
			}
			out[i], errs[i] = d.c.Action(ctx, inst.ID, action, r)
			lat[i] = time.Since(t)
			if errs[i] != nil {
				errs[i] = fmt.Errorf("%s %s: %w", action, inst.Name, errs[i])
			}
		}()
	}
	wg.Wait()
	return out, lat, errors.Join(errs...)
}

// see remembers an instance's VMM pid, to kill it at cleanup if the daemon
// left it behind.
func (d *demo) see(inst api.Instance) {
	if inst.Pid > 0 {
		d.mu.Lock()
		d.pids[inst.Pid]++
		d.mu.Unlock()
	}
}

// startDaemon runs `<this binary> serve` on the temp data dir and waits
// until it answers.
func (d *demo) startDaemon(ctx context.Context) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find this binary: %w", err)
	}
	logf, err := os.Create(filepath.Join(d.dir, "daemon.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(exe, "serve", "--data-dir", d.data, "--log-format", "json", "--log-level", "debug",
		"--vmm-binary", d.o.vmm)
	// The daemon must not pick up the caller's FORKD_* settings.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "FORKD_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	// If the demo dies, its daemon gets SIGTERM rather than living on.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start daemon: %w", err)
	}
	d.daemon = cmd
	d.exited = make(chan struct{})
	go func() { _ = cmd.Wait(); close(d.exited) }()

	sock := filepath.Join(d.data, api.SocketName)
	if d.c, err = api.NewClient(sock); err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if _, err := d.c.WaitHealthy(wctx, d.exited); err != nil {
		if errors.Is(err, api.ErrDaemonExited) {
			return fmt.Errorf("the daemon exited during startup (%v); its log:\n%s", cmd.ProcessState, d.logTail())
		}
		return fmt.Errorf("%w; its log:\n%s", err, d.logTail())
	}
	d.progress("started daemon pid %d on data dir %s", cmd.Process.Pid, d.data)
	return nil
}

func (d *demo) logTail() string {
	b, _ := os.ReadFile(filepath.Join(d.dir, "daemon.log"))
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return "  " + strings.Join(lines, "\n  ")
}

// cleanup removes every instance, stops the daemon, kills any VMM or pager
// of this demo that is left (only processes whose command line names the
// temp dir), and removes the temp dir.
func (d *demo) cleanup() error {
	var errs []error
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if d.c != nil && d.daemon != nil {
		if list, err := d.c.ListInstances(ctx); err == nil {
			for _, inst := range list {
				d.see(inst)
				if err := d.c.DeleteInstance(ctx, inst.ID); err != nil && !errors.Is(err, api.ErrNotImplemented) {
					errs = append(errs, fmt.Errorf("cleanup: delete %s: %w", inst.Name, err))
				}
			}
		}
		d.c.Close()
	}
	if d.daemon != nil {
		_ = d.daemon.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.exited:
		case <-time.After(30 * time.Second):
			_ = d.daemon.Process.Kill()
			<-d.exited
			errs = append(errs, errors.New("cleanup: the daemon ignored SIGTERM for 30s; killed it"))
		}
	}
	// VMMs and the pager run in their own sessions and outlive the daemon
	// by design; the demo owns them, so it ends them.
	var pids []int
	d.mu.Lock()
	for pid := range d.pids {
		pids = append(pids, pid)
	}
	d.mu.Unlock()
	pagerPids, _ := filepath.Glob(filepath.Join(d.data, "pager", "*", "pager.pid"))
	for _, p := range pagerPids {
		if b, err := os.ReadFile(p); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				pids = append(pids, pid)
			}
		}
	}
	sort.Ints(pids)
	for _, pid := range pids {
		d.killOwned(pid)
	}
	if d.o.keep {
		fmt.Fprintf(d.out, "kept %s (daemon log: %s)\n", d.dir, filepath.Join(d.dir, "daemon.log"))
	} else if err := os.RemoveAll(d.dir); err != nil {
		errs = append(errs, fmt.Errorf("cleanup: %w", err))
	}
	return errors.Join(errs...)
}

// killOwned SIGKILLs pid if its command line mentions the demo's temp dir:
// a pid from an old list may have been reused by an unrelated process.
func (d *demo) killOwned(pid int) {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(cmdline), d.dir) {
		return
	}
	if p, err := os.FindProcess(pid); err == nil {
		_ = p.Signal(syscall.SIGKILL)
	}
}
