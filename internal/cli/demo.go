package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/daemonproc"
	"github.com/forkd/forkd/internal/network"
)

// demoOptions are the knobs of `forkd demo`.
type demoOptions struct {
	memoryMiB int
	forks     int
	keep      bool
	kernel    string
	vmm       string
	bootArgs  string
	// binary is the forkd the demo's daemon runs (default: this executable).
	binary string
}

func newDemoCommand() *cobra.Command {
	o := demoOptions{}
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Start a throwaway daemon and drive it end to end: create, standby, fork burst, restore",
		Long: `Start a daemon of this binary in a temporary data dir, drive it through the API
and clean everything up (daemon, VMMs, pager, temp dir):

  create a VM, stand it by, fork it N times in a burst (hardlinked memory: no
  copy) and N more in one batch call, delete the source, restore every fork
  (half through the userfaultfd pager, half from the file), stand them all by
  again, and show fork latencies, fork modes, the pager's hit rate and each
  VM's memory integrity check.

It exits non-zero if any step fails; nothing falls back quietly (a pager that
cannot start fails the demo). With -o json the steps go to stderr and a JSON
report of every step's outcome and every memory check to stdout.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := jsonOutput(cmd)
			if err != nil {
				return err
			}
			progress := stdout(cmd)
			if asJSON {
				progress = cmd.ErrOrStderr()
			}
			rep, err := runDemo(cmd.Context(), progress, o)
			if asJSON {
				if perr := printJSON(stdout(cmd), rep); perr != nil && err == nil {
					err = perr
				}
			}
			return err
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.memoryMiB, "memory", 512, "guest memory of the demo VM in MiB")
	f.IntVar(&o.forks, "forks", 10, "forks in the burst (at least 2: half restore through the pager)")
	f.BoolVar(&o.keep, "keep", false, "keep the temp data dir (and the daemon's log) for inspection")
	f.StringVar(&o.kernel, "kernel", "", "kernel image (default: a placeholder file, which the built-in emulator accepts)")
	f.StringVar(&o.vmm, "vmm-binary", "emulator", "the daemon's vmm_binary (emulator runs anywhere; use auto or a path with a real --kernel for Firecracker)")
	f.StringVar(&o.bootArgs, "boot-args", "forkd.ws_mib=32 forkd.write_pct=20 forkd.rate=2000 forkd.seed=7",
		"boot args of the demo VM (the emulator's guest workload reads forkd.*)")
	return cmd
}

// demoStepNames are the demo's steps, in order. A passing run reports each
// exactly once with ok set; the demo's test checks that list against this
// one, so a step that is added here must also run.
var demoStepNames = []string{
	"daemon",        // start `forkd serve` on a temp data dir
	"health",        // GET /health
	"list",          // GET /instances on a fresh data dir: empty
	"create",        // one Running VM
	"standby",       // its first (Full) snapshot
	"fork-burst",    // N concurrent forks: hardlinked memory
	"fork-batch",    // N more forks in one all-or-none call, then deleted
	"delete-source", // the forks stay intact
	"restore",       // every fork, half through the pager
	"fork-answers",  // a fork answers at its own address with its source's boot_id
	"standby-forks", // every fork's first standby (unshares its memory)
	"memory-checks", // every VM's integrity check, and the pager's hit rate
}

// demoReport is what one run found: each step's outcome and every VM's
// memory check. `forkd demo -o json` prints it.
type demoReport struct {
	DataDir         string            `json:"data_dir"`
	Steps           []demoStep        `json:"steps"`
	MemoryChecks    map[string]string `json:"memory_checks"` // instance name → memory_check at its last standby
	ForkModes       map[string]int    `json:"fork_modes"`
	RestoreBackends map[string]int    `json:"restore_backends"`
	PagerHits       int64             `json:"pager_hits"`
	PagerMisses     int64             `json:"pager_misses"`
	Passed          bool              `json:"passed"`
	Error           string            `json:"error,omitempty"`
}

type demoStep struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"` // what it measured, or the error
}

// demo is one run of `forkd demo`.
type demo struct {
	out    io.Writer
	o      demoOptions
	dir    string // temp dir: data/, daemon.log, vmlinux
	data   string
	netns  string // the network namespace the daemon runs in (its VMs' networks hang off it)
	bootID string // the source's guest boot_id, read at its address
	daemon *daemonproc.Proc
	c      *api.Client
	rep    *demoReport
}

func runDemo(ctx context.Context, out io.Writer, o demoOptions) (_ *demoReport, err error) {
	rep := &demoReport{MemoryChecks: map[string]string{}, ForkModes: map[string]int{}, RestoreBackends: map[string]int{}}
	if o.forks < 2 {
		return rep, fmt.Errorf("demo: --forks %d: want at least 2 (half the forks restore through the pager, half from the file)", o.forks)
	}
	dir, err := os.MkdirTemp("", "forkd-demo-")
	if err != nil {
		return rep, fmt.Errorf("demo: %w", err)
	}
	d := &demo{out: out, o: o, dir: dir, data: filepath.Join(dir, "data"), rep: rep}
	rep.DataDir = d.data
	defer func() {
		if cerr := d.cleanup(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		rep.Passed = err == nil
		if err != nil {
			err = fmt.Errorf("demo failed: %w", err)
			rep.Error = err.Error()
		}
	}()
	start := time.Now()
	if err := d.run(ctx); err != nil {
		return rep, err
	}
	fmt.Fprintf(d.out, "demo passed in %s\n", time.Since(start).Round(time.Millisecond))
	return rep, nil
}

// step runs one step of demoStepNames, records its outcome and prints it.
func (d *demo) step(name string, fn func() (string, error)) error {
	detail, err := fn()
	st := demoStep{Name: name, OK: err == nil, Detail: detail}
	if err != nil {
		st.Detail = err.Error()
	}
	d.rep.Steps = append(d.rep.Steps, st)
	mark := ""
	if err != nil {
		mark = "FAILED: "
	}
	fmt.Fprintf(d.out, "[%2d/%d] %s%s\n", len(d.rep.Steps), len(demoStepNames), mark, st.Detail)
	return err
}

func (d *demo) run(ctx context.Context) error {
	if err := d.step("daemon", func() (string, error) { return d.startDaemon(ctx) }); err != nil {
		return err
	}
	if err := d.step("health", func() (string, error) {
		h, err := d.c.Health(ctx)
		if err != nil {
			return "", fmt.Errorf("health: %w", err)
		}
		detail := fmt.Sprintf("daemon healthy: version %s, socket %s", h.Version, d.c.Host())
		for _, a := range h.Advice { // what this host costs the steps below (a data dir that cannot reflink)
			detail += "\n        advice: " + a
		}
		return detail, nil
	}); err != nil {
		return err
	}
	if err := d.step("list", func() (string, error) {
		list, err := d.c.ListInstances(ctx)
		if err != nil {
			return "", fmt.Errorf("list instances: %w", err)
		}
		if len(list) != 0 {
			return "", fmt.Errorf("list instances: %d on a fresh data dir, want none", len(list))
		}
		return "instances listed: 0 (a fresh data dir)", nil
	}); err != nil {
		return err
	}

	var src api.Instance
	if err := d.step("create", func() (string, error) {
		kernel := d.o.kernel
		if kernel == "" {
			kernel = filepath.Join(d.dir, "vmlinux")
			if err := os.WriteFile(kernel, []byte("placeholder kernel: the emulator does not execute it\n"), 0o600); err != nil {
				return "", err
			}
		}
		t := time.Now()
		var err error
		src, err = d.c.CreateInstance(ctx, api.CreateInstanceRequest{
			Name: "demo-src", Vcpus: 1, MemoryMiB: d.o.memoryMiB, Kernel: kernel, BootArgs: d.o.bootArgs,
		})
		if err != nil {
			return "", fmt.Errorf("create instance: %w", err)
		}
		if src.State != api.StateRunning {
			return "", fmt.Errorf("create instance: %s is %s (error %q), want Running", src.Name, src.State, src.Error)
		}
		took := time.Since(t)
		if d.bootID, err = d.guestBootID(ctx, src); err != nil {
			return "", err
		}
		return fmt.Sprintf("created %s (%s): %d MiB, %s, VMM pid %d, at %s (guest boot_id %s), in %s",
			src.Name, shortID(src.ID), src.MemoryMiB, src.State, src.Pid, src.Network.Address, d.bootID, ms(took)), nil
	}); err != nil {
		return err
	}
	time.Sleep(time.Second) // not synchronisation: the guest workload dirties memory for the snapshot to hold

	if err := d.step("standby", func() (string, error) {
		t := time.Now()
		var err error
		if src, err = d.c.Action(ctx, src.ID, "standby", api.ActionRequest{}); err != nil {
			return "", fmt.Errorf("standby %s: %w", "demo-src", err)
		}
		if err := wantParked(src); err != nil {
			return "", err
		}
		d.rep.MemoryChecks[src.Name] = src.MemoryCheck
		return fmt.Sprintf("standby %s: %s in %s (cache key %s, memory check %s)", src.Name, src.State, ms(time.Since(t)), dash(src.SnapshotCacheKey), src.MemoryCheck), nil
	}); err != nil {
		return err
	}

	var forks []api.Instance
	if err := d.step("fork-burst", func() (string, error) {
		var lat []time.Duration
		var err error
		if forks, lat, err = d.forkBurst(ctx, src); err != nil {
			return "", err
		}
		for _, f := range forks {
			d.rep.ForkModes[f.ForkMode]++
			if f.State != api.StateStandby {
				return "", fmt.Errorf("fork %s is %s, want Standby", f.Name, f.State)
			}
		}
		return fmt.Sprintf("forked %d in a burst: p50 %s, max %s; modes %v", len(forks), ms(percentile(lat, 0.5)), ms(percentile(lat, 1)), d.rep.ForkModes), nil
	}); err != nil {
		return err
	}

	if err := d.step("fork-batch", func() (string, error) {
		t := time.Now()
		batch, err := d.c.ForkInstanceBatch(ctx, src.ID, api.ForkBatchRequest{Name: "demo-batch", Count: d.o.forks})
		took := time.Since(t)
		if err != nil {
			return "", fmt.Errorf("fork batch: %w", err)
		}
		if len(batch) != d.o.forks {
			return "", fmt.Errorf("fork batch: %d forks, want %d", len(batch), d.o.forks)
		}
		for _, f := range batch {
			if f.State != api.StateStandby || f.ForkMode == "" {
				return "", fmt.Errorf("batch fork %s is %s (fork mode %q), want Standby with its memory shared", f.Name, f.State, f.ForkMode)
			}
		}
		// The rest of the demo goes on with the burst's forks.
		for _, f := range batch {
			if err := d.c.DeleteInstance(ctx, f.ID); err != nil {
				return "", fmt.Errorf("delete batch fork %s: %w", f.Name, err)
			}
		}
		return fmt.Sprintf("forked %d more in one batch call (all or none): %s for all of them, %s a fork; deleted them again", len(batch), ms(took), ms(took/time.Duration(len(batch)))), nil
	}); err != nil {
		return err
	}

	if err := d.step("delete-source", func() (string, error) {
		if err := d.c.DeleteInstance(ctx, src.ID); err != nil {
			return "", fmt.Errorf("delete source: %w", err)
		}
		for _, f := range forks {
			got, err := d.c.GetInstance(ctx, f.ID)
			if err != nil || got.State != api.StateStandby {
				return "", fmt.Errorf("fork %s after deleting its source: %s, %v; want it intact in Standby", f.Name, got.State, err)
			}
		}
		return fmt.Sprintf("deleted the source; all %d forks intact (they hold the memory file's inode)", len(forks)), nil
	}); err != nil {
		return err
	}

	var restored []api.Instance
	if err := d.step("restore", func() (string, error) {
		// Half the forks restore through the pager, so its shared cache
		// shows: the first uffd sibling misses, the rest should hit. A
		// pager that cannot start fails this step: nothing falls back.
		var lat []time.Duration
		var err error
		restored, lat, err = d.all(ctx, forks, "restore", func(i int) api.ActionRequest {
			if i%2 == 1 {
				return api.ActionRequest{RestoreBackend: api.BackendUffd}
			}
			return api.ActionRequest{RestoreBackend: api.BackendFile}
		})
		if err != nil {
			return "", err
		}
		for _, f := range restored {
			d.rep.RestoreBackends[f.RestoreBackend]++
			if f.State != api.StateRunning {
				return "", fmt.Errorf("restore %s: %s (error %q), want Running", f.Name, f.State, f.Error)
			}
		}
		return fmt.Sprintf("restored %d forks: p50 %s, max %s; backends %v", len(restored), ms(percentile(lat, 0.5)), ms(percentile(lat, 1)), d.rep.RestoreBackends), nil
	}); err != nil {
		return err
	}
	if err := d.step("fork-answers", func() (string, error) {
		f := restored[0]
		id, err := d.guestBootID(ctx, f)
		if err != nil {
			return "", err
		}
		if id != d.bootID {
			return "", fmt.Errorf("fork %s at %s reports boot_id %s, want its source's %s", f.Name, f.Network.Address, id, d.bootID)
		}
		return fmt.Sprintf("fork %s answers at http://%s/ with boot_id %s: its source's guest, unchanged, at an address of its own", f.Name, f.Network.Address, id), nil
	}); err != nil {
		return err
	}
	time.Sleep(time.Second) // not synchronisation: every fork's workload runs and verifies pages before the checks

	var parked []api.Instance
	if err := d.step("standby-forks", func() (string, error) {
		var lat []time.Duration
		var err error
		if parked, lat, err = d.all(ctx, restored, "standby", nil); err != nil {
			return "", err
		}
		for _, f := range parked {
			if err := wantParked(f); err != nil {
				return "", err
			}
			d.rep.MemoryChecks[f.Name] = f.MemoryCheck
		}
		return fmt.Sprintf("stood %d forks by again (first standby of a fork unshares its memory): p50 %s, max %s",
			len(parked), ms(percentile(lat, 0.5)), ms(percentile(lat, 1))), nil
	}); err != nil {
		return err
	}

	return d.step("memory-checks", func() (string, error) {
		var bad []string
		for name, check := range d.rep.MemoryChecks {
			if check != "ok" {
				bad = append(bad, name+": "+check)
			}
		}
		raw, err := d.c.PagerStats(ctx)
		if err != nil {
			return "", fmt.Errorf("pager stats: %w", err)
		}
		hits, misses, ok := hitsMisses(raw)
		if !ok {
			return "", fmt.Errorf("pager stats: no hit and miss counters in %s", raw)
		}
		d.rep.PagerHits, d.rep.PagerMisses = hits, misses
		if len(bad) > 0 {
			return "", fmt.Errorf("memory integrity errors: %s", strings.Join(bad, "; "))
		}
		hit := "n/a (no page served)"
		if hits+misses > 0 {
			hit = fmt.Sprintf("%.1f%% (%d hits, %d misses)", 100*float64(hits)/float64(hits+misses), hits, misses)
		}
		return fmt.Sprintf("memory checks: %d ok; pager hit rate %s", len(d.rep.MemoryChecks), hit), nil
	})
}

// wantParked checks that a standby left inst on Standby with a memory check
// the emulator vouched for ("unknown" would mean nobody checked).
func wantParked(inst api.Instance) error {
	if inst.State != api.StateStandby {
		return fmt.Errorf("standby %s: %s (error %q), want Standby", inst.Name, inst.State, inst.Error)
	}
	if inst.MemoryCheck != "ok" {
		return fmt.Errorf("standby %s: memory check %q, want ok", inst.Name, inst.MemoryCheck)
	}
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

// startDaemon runs `forkd serve` on the temp data dir and waits until it
// answers. The daemon gets SIGTERM if the demo dies first.
func (d *demo) startDaemon(ctx context.Context) (string, error) {
	bin := d.o.binary
	if bin == "" {
		exe, err := os.Executable()
		if err != nil {
			return "", fmt.Errorf("find this binary: %w", err)
		}
		bin = exe
	}
	// The daemon runs in a network namespace of the demo's own: every VM's
	// network hangs off it, and nothing touches the host's network.
	ns, err := network.NewNamespace("forkd-demo-" + randomSuffix())
	if err != nil {
		return "", fmt.Errorf("create the demo's network namespace (needs root and network namespaces): %w", err)
	}
	d.netns = ns
	p, err := daemonproc.Start(ctx, daemonproc.Spec{
		Binary:  bin,
		DataDir: d.data,
		Args: []string{"--log-format", "json", "--log-level", "debug", "--vmm-binary", d.o.vmm,
			"--network-cidr", demoNetworkCIDR, "--network-default=true"},
		LogPath:           filepath.Join(d.dir, "daemon.log"),
		ParentDeathSignal: syscall.SIGTERM,
		NetNS:             ns,
	})
	if err != nil {
		return "", err
	}
	d.daemon, d.c = p, p.Client
	return fmt.Sprintf("started daemon pid %d on data dir %s, in network namespace %s (VM addresses from %s)", p.Pid(), d.data, filepath.Base(ns), demoNetworkCIDR), nil
}

// demoNetworkCIDR is the demo's address pool: RFC 2544's benchmarking
// range, routed only inside the demo's namespace.
const demoNetworkCIDR = "198.18.0.0/24"

// guestBootID GETs / from a VM's guest at its address, once, from inside
// the demo's namespace (where the VM's address is routed), and returns the
// guest's boot_id.
func (d *demo) guestBootID(ctx context.Context, in api.Instance) (string, error) {
	if !in.Network.Enabled {
		return "", fmt.Errorf("%s has no network", in.Name)
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, addr string) (c net.Conn, err error) {
			err = network.Do(d.netns, func() (err error) { c, err = (&net.Dialer{}).DialContext(ctx, "tcp4", addr); return err })
			return c, err
		},
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+in.Network.Address+"/", nil)
	if err != nil {
		return "", err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return "", fmt.Errorf("GET / at %s's address %s: %w", in.Name, in.Network.Address, err)
	}
	defer resp.Body.Close()
	var body struct {
		BootID string `json:"boot_id"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || resp.StatusCode != http.StatusOK || body.BootID == "" {
		return "", fmt.Errorf("GET / at %s's address %s: status %d, boot_id %q (%v)", in.Name, in.Network.Address, resp.StatusCode, body.BootID, err)
	}
	return body.BootID, nil
}

// cleanup deletes every instance, stops the daemon, kills any VMM or pager
// of this demo that is left (processes whose command line names its data
// dir), and removes the temp dir.
func (d *demo) cleanup() error {
	var errs []error
	if d.daemon != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := d.daemon.Teardown(ctx, 30*time.Second); err != nil {
			errs = append(errs, fmt.Errorf("cleanup: %w", err))
		}
	}
	if d.netns != "" {
		if err := network.RemoveNamespace(d.netns); err != nil {
			errs = append(errs, fmt.Errorf("cleanup: %w", err))
		}
	}
	if d.o.keep {
		fmt.Fprintf(d.out, "kept %s (daemon log: %s)\n", d.dir, filepath.Join(d.dir, "daemon.log"))
	} else if err := os.RemoveAll(d.dir); err != nil {
		errs = append(errs, fmt.Errorf("cleanup: %w", err))
	}
	return errors.Join(errs...)
}
