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
	fromRunning    bool
	targetState    string
	restoreBackend string
	publish        []string
}

func (o *forkOptions) bind(cmd *cobra.Command, live bool) {
	f := cmd.Flags()
	f.IntVarP(&o.count, "count", "n", 0, "make N forks concurrently, named NAME-1..NAME-N, and print each one's latency")
	f.StringVar(&o.targetState, "target-state", "", "Standby, Running or Stopped (default: the source's state)")
	f.StringVar(&o.restoreBackend, "restore-backend", "", "backend of the fork's first restore: file or uffd (default: the daemon's fork_restore_backend)")
	f.StringArrayVarP(&o.publish, "publish", "p", nil, "publish a port of the fork, as [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp] (repeatable; forks never inherit their source's)")
	if live {
		f.BoolVar(&o.fromRunning, "from-running", false, "fork a Running instance live (it pauses briefly and keeps running)")
	}
}

// forkResult is one fork of a burst.
type forkResult struct {
	Name     string        `json:"name"`
	Latency  time.Duration `json:"-"`
	Seconds  float64       `json:"latency_seconds"`
	Instance *api.Instance `json:"instance,omitempty"`
	Error    string        `json:"error,omitempty"`
	// Retries counts the 429 busy answers retried before this fork was
	// admitted (its latency includes the waits).
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

With --count N, N forks are made concurrently, named NAME-1..NAME-N, and each
one's latency is printed.`,
		Example: `  forkd fork web web-copy
  forkd fork web --count 10 --target-state Running
  forkd fork web live --from-running`,
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
			call := func(ctx context.Context, req api.ForkRequest) (api.Instance, error) {
				return c.ForkInstance(ctx, src, req)
			}
			err = runForks(cmd, o, name, call)
			return withHint(err, api.ErrInvalidState,
				"instance %q must be in Standby to fork; stand it by first (`forkd standby %s`) or pass --from-running", src, src)
		},
	}
	o.bind(cmd, true)
	return cmd
}

// runForks makes one fork (count 0) or a concurrent burst and prints them.
func runForks(cmd *cobra.Command, o forkOptions, name string, call func(context.Context, api.ForkRequest) (api.Instance, error)) error {
	asJSON, err := jsonOutput(cmd)
	if err != nil {
		return err
	}
	if o.count < 0 || o.count > 1000 {
		return fmt.Errorf("--count %d: want 1..1000", o.count)
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
		names = names[:0]
		for i := 1; i <= o.count; i++ {
			names = append(names, fmt.Sprintf("%s-%d", name, i))
		}
	}
	results := make([]forkResult, len(names))
	start := time.Now()
	var wg sync.WaitGroup
	for i, n := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.Now()
			inst, retries, err := retryBusy(cmd.Context(), func() (api.Instance, error) {
				return call(cmd.Context(), api.ForkRequest{
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
		}()
	}
	wg.Wait()
	wall := time.Since(start)

	var errs []error
	var lat []time.Duration
	for _, r := range results {
		if r.err != nil {
			errs = append(errs, fmt.Errorf("fork %s: %w", r.Name, r.err))
		} else {
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
			fmt.Fprintf(stdout(cmd), "%d/%d forks in %s: p50 %s, p90 %s, max %s\n", len(lat), len(results), ms(wall),
				ms(percentile(lat, 0.5)), ms(percentile(lat, 0.9)), ms(percentile(lat, 1)))
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
	}
	return errors.Join(errs...)
}

// busyRetryFor bounds how long one fork keeps retrying a busy daemon.
const busyRetryFor = 5 * time.Minute

// retryBusy calls fn until the daemon admits it: a 429 busy is retried
// after its Retry-After (1 s without one), with some jitter so a burst's
// forks do not all come back at once, for up to busyRetryFor. It returns
// how many times it retried.
func retryBusy(ctx context.Context, fn func() (api.Instance, error)) (api.Instance, int, error) {
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
