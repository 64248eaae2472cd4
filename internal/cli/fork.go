package cli

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/api"
)

// forkOptions are the flags shared by `fork` and `snapshot fork`.
type forkOptions struct {
	count          int
	separate       bool
	fromRunning    bool
	targetState    string
	restoreBackend string
	publish        []string
}

func (o *forkOptions) bind(cmd *cobra.Command, live bool) {
	f := cmd.Flags()
	f.IntVarP(&o.count, "count", "n", 0, "make N forks, named NAME-1..NAME-N, in one batch call (all or none), and print the call's latency")
	f.BoolVar(&o.separate, "separate", false, "with --count: make the forks with N concurrent single-fork calls instead of one batch, each with its own latency and busy retries, keeping those that succeed")
	f.StringVar(&o.targetState, "target-state", "", "Standby, Running or Stopped (default: the source's state)")
	f.StringVar(&o.restoreBackend, "restore-backend", "", "backend of the fork's first restore: file or uffd (default: the daemon's fork_restore_backend)")
	f.StringArrayVarP(&o.publish, "publish", "p", nil, "publish a port of the fork, as [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp] (repeatable; forks never inherit their source's)")
	if live {
		f.BoolVar(&o.fromRunning, "from-running", false, "fork a Running instance live (it pauses briefly and keeps running); with --count it implies --separate")
	}
}

// batched says whether --count's forks are made with one batch call: the
// daemon's batch takes no live fork, so --from-running always makes them
// separately.
func (o forkOptions) batched() bool { return o.count > 0 && !o.separate && !o.fromRunning }

// forkCalls are one source's fork calls.
type forkCalls struct {
	one   func(context.Context, api.ForkRequest) (api.Instance, error)
	batch func(context.Context, api.ForkBatchRequest) ([]api.Instance, error) // all or none
}

// forkResult is one fork of a burst.
type forkResult struct {
	Name     string        `json:"name"`
	Latency  time.Duration `json:"-"`
	Seconds  float64       `json:"latency_seconds"`
	Instance *api.Instance `json:"instance,omitempty"`
	Error    string        `json:"error,omitempty"`
	// Retries counts the 429 busy answers retried before this fork was
	// admitted (its latency includes the waits); for a batch, the batch's.
	Retries int `json:"retries,omitempty"`
	err     error
}

func newForkCommand() *cobra.Command {
	var o forkOptions
	cmd := &cobra.Command{
		Use:   "fork SRC [NAME]",
		Short: "Fork an instance (Standby, or Running with --from-running)",
		Long: `Fork an instance. A fork of a Standby instance shares its memory file (a hardlink:
no memory is copied) and is independent the moment it exists: deleting the source
does not affect it. A Running instance forks with --from-running.

With --count N, N forks named NAME-1..NAME-N are made in one batch call: all of
them or, if any one fails, none. Each fork is printed with the call's latency. A
daemon at its max_heavy_ops answers busy before making anything, and the whole
batch is retried after its Retry-After.

With --separate, --count's forks are made with N concurrent single-fork calls
instead: each fork has its own latency and busy retries, and those that succeed
are kept when others fail. --from-running always forks that way (a live fork is
never made in a batch).`,
		Example: `  forkd fork web web-copy
  forkd fork web --count 10 --target-state Running     # one batch: 10 forks or none
  forkd fork web kid --count 10 --separate             # 10 concurrent single forks
  forkd fork web live --from-running
  forkd fork web live --from-running --count 3         # 3 live forks, separately`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := NewClient(cmd)
			if err != nil {
				return err
			}
			src := args[0]
			name := ""
			if len(args) == 2 {
				name = args[1]
			} else {
				inst, err := c.GetInstance(cmd.Context(), src)
				if err != nil {
					return err
				}
				name = forkBaseName(inst.Name)
			}
			err = runForks(cmd, o, name, forkCalls{
				one: func(ctx context.Context, req api.ForkRequest) (api.Instance, error) {
					return c.ForkInstance(ctx, src, req)
				},
				batch: func(ctx context.Context, req api.ForkBatchRequest) ([]api.Instance, error) {
					return c.ForkInstanceBatch(ctx, src, req)
				},
			})
			return withHint(err, api.ErrInvalidState,
				"instance %q must be in Standby to fork; stand it by first (`forkd standby %s`) or pass --from-running", src, src)
		},
	}
	o.bind(cmd, true)
	return cmd
}

// runForks makes one fork (count 0) or --count's forks, in one batch or
// separately, and prints them.
func runForks(cmd *cobra.Command, o forkOptions, name string, calls forkCalls) error {
	asJSON, err := jsonOutput(cmd)
	if err != nil {
		return err
	}
	if o.count < 0 || o.count > api.MaxForkBatch {
		return fmt.Errorf("--count %d: want 1..%d", o.count, api.MaxForkBatch)
	}
	if o.separate && o.count == 0 {
		return fmt.Errorf("--separate says how --count's forks are made; give --count too")
	}
	pubs, err := parsePublishes(o.publish)
	if err != nil {
		return err
	}
	if len(pubs) > 0 && o.count > 0 {
		return fmt.Errorf("--publish with --count: every fork would claim the same host port; publish to one fork at a time")
	}
	names := []string{name}
	if o.count > 0 {
		names = api.ForkBatchRequest{Name: name, Count: o.count}.Names()
	}
	start := time.Now()
	var results []forkResult
	var errs []error
	if o.batched() {
		var err error
		if results, err = batchForks(cmd.Context(), o, name, names, calls.batch); err != nil {
			errs = append(errs, fmt.Errorf("fork %s..%s (one batch, all or none): %w", names[0], names[len(names)-1], err))
		}
	} else {
		results = separateForks(cmd.Context(), o, names, pubs, calls.one)
		for _, r := range results {
			if r.err != nil {
				errs = append(errs, fmt.Errorf("fork %s: %w", r.Name, r.err))
			}
		}
	}
	wall := time.Since(start)

	var lat []time.Duration
	for _, r := range results {
		if r.err == nil {
			lat = append(lat, r.Latency)
		}
	}
	switch {
	case asJSON && o.count == 0 && results[0].Instance != nil:
		if err := printJSON(stdout(cmd), results[0].Instance); err != nil {
			return err
		}
	case asJSON && o.count > 0:
		if err := printJSON(stdout(cmd), results); err != nil {
			return err
		}
	case !asJSON && (o.count > 0 || results[0].Instance != nil):
		tw := newTable(stdout(cmd))
		fmt.Fprintln(tw, "NAME\tID\tSTATE\tFORK MODE\tLATENCY")
		for _, r := range results {
			if r.Instance == nil {
				fmt.Fprintf(tw, "%s\t-\tfailed\t-\t%s\n", r.Name, ms(r.Latency))
				continue
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.Name, shortID(r.Instance.ID), r.Instance.State, dash(r.Instance.ForkMode), ms(r.Latency))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		if o.count > 0 {
			how := ""
			if o.batched() {
				how = " (one batch call)"
			}
			fmt.Fprintf(stdout(cmd), "%d/%d forks in %s%s: p50 %s, p90 %s, max %s\n", len(lat), len(results), ms(wall), how,
				ms(percentile(lat, 0.5)), ms(percentile(lat, 0.9)), ms(percentile(lat, 1)))
			printRetries(cmd, o, results)
		}
	}
	return errors.Join(errs...)
}

// printRetries says how long the daemon's max_heavy_ops held the forks back.
func printRetries(cmd *cobra.Command, o forkOptions, results []forkResult) {
	if o.batched() {
		if n := results[0].Retries; n > 0 {
			fmt.Fprintf(stdout(cmd), "the batch waited for the daemon's max_heavy_ops (%d busy answers retried)\n", n)
		}
		return
	}
	retried, retries := 0, 0
	for _, r := range results {
		if r.Retries > 0 {
			retried++
			retries += r.Retries
		}
	}
	if retried > 0 {
		fmt.Fprintf(stdout(cmd), "%d forks waited for the daemon's max_heavy_ops (%d busy answers retried)\n", retried, retries)
	}
}

// batchForks makes names (name-1..name-N) with one batch call, retried
// whole while the daemon answers busy: a busy batch was refused before
// anything was made, so a retry cannot make a fork twice. Every fork's
// result has the call's latency and retries; when the batch fails, every
// one has its error and no instance (the batch is all or none).
func batchForks(ctx context.Context, o forkOptions, name string, names []string,
	call func(context.Context, api.ForkBatchRequest) ([]api.Instance, error)) ([]forkResult, error) {
	t := time.Now()
	forks, retries, err := retryBusy(ctx, func() ([]api.Instance, error) {
		return call(ctx, api.ForkBatchRequest{Name: name, Count: o.count, TargetState: o.targetState, RestoreBackend: o.restoreBackend})
	})
	latency := time.Since(t)
	if err == nil && len(forks) != len(names) {
		err = fmt.Errorf("the daemon answered a batch of %d forks with %d", len(names), len(forks))
	}
	results := make([]forkResult, len(names))
	for i, n := range names {
		r := forkResult{Name: n, Latency: latency, Seconds: latency.Seconds(), Retries: retries, err: err}
		if err != nil {
			r.Error = err.Error()
		} else {
			r.Instance = &forks[i]
		}
		results[i] = r
	}
	return results, err
}

// separateForks makes each of names with its own fork call, all at once,
// each retried on its own while the daemon answers busy.
func separateForks(ctx context.Context, o forkOptions, names []string, pubs []api.PortPublish,
	call func(context.Context, api.ForkRequest) (api.Instance, error)) []forkResult {
	results := make([]forkResult, len(names))
	var wg sync.WaitGroup
	for i, n := range names {
		wg.Go(func() {
			t := time.Now()
			inst, retries, err := retryBusy(ctx, func() (api.Instance, error) {
				return call(ctx, api.ForkRequest{
					Name: n, FromRunning: o.fromRunning, TargetState: o.targetState, RestoreBackend: o.restoreBackend,
					Publish: pubs,
				})
			})
			r := forkResult{Name: n, Latency: time.Since(t), Retries: retries, err: err}
			r.Seconds = r.Latency.Seconds()
			if err != nil {
				r.Error = err.Error()
			} else {
				r.Instance = &inst
			}
			results[i] = r
		})
	}
	wg.Wait()
	return results
}

// busyRetryFor bounds how long one fork keeps retrying a busy daemon.
const busyRetryFor = 5 * time.Minute

// retryBusy calls fn until the daemon admits it: a 429 busy is retried
// after its Retry-After (1 s without one), with some jitter so a burst's
// forks do not all come back at once, for up to busyRetryFor. It returns
// how many times it retried.
func retryBusy[T any](ctx context.Context, fn func() (T, error)) (T, int, error) {
	deadline := time.Now().Add(busyRetryFor)
	for retries := 0; ; retries++ {
		inst, err := fn()
		if !errors.Is(err, api.ErrBusy) || time.Now().After(deadline) {
			return inst, retries, err
		}
		wait := time.Second
		var se *api.StatusError
		if errors.As(err, &se) && se.RetryAfter > 0 {
			wait = se.RetryAfter
		}
		wait += time.Duration(rand.Int64N(int64(wait) / 2))
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return inst, retries, err
		}
	}
}
