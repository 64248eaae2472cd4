package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/api"
)

func newEventsCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "events",
		Short: "Stream what happens from now on: state changes, forks, snapshots, errors, deletes",
		Long: `Print each event as it happens, one per line, until interrupted (or the
daemon stops). With -o json each line is the event's JSON, as GET /events
sends it.`,
		Example: `  forkd events
  forkd events -o json | jq 'select(.type == "instance.error")'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, asJSON, err := clientFor(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, os.Interrupt)
			defer stop()
			out := stdout(cmd)
			err = c.EventStream(ctx, func(ev api.Event) error {
				if asJSON {
					return printJSONCompact(out, ev)
				}
				return printEvent(out, ev)
			})
			if errors.Is(err, api.ErrStreamEnded) {
				return fmt.Errorf("events: %w (the daemon stopped, or this client fell behind)", err)
			}
			return err
		},
	}
	return cmd
}

// printEvent writes one event for people: time, type, subject, state and
// error.
func printEvent(w io.Writer, ev api.Event) error {
	subject := "-"
	switch {
	case ev.Instance != nil:
		subject = ev.Instance.Name + " (" + shortID(ev.Instance.ID) + ")"
	case ev.Snapshot != nil:
		subject = ev.Snapshot.Name + " (" + shortID(ev.Snapshot.ID) + ")"
	}
	line := fmt.Sprintf("%s  %-17s %s  %s", ev.Time.Local().Format("15:04:05.000"), ev.Type, subject, dash(ev.State))
	if ev.Error != "" {
		line += "  error: " + ev.Error
	}
	_, err := fmt.Fprintln(w, line)
	return err
}

// Exit codes of `forkd wait`.
const (
	waitReached  = 0 // the instance is in the state
	waitTimedOut = 1 // the timeout passed first
	waitFailed   = 2 // it reached Error or was deleted: it will not get there
	waitUnknown  = 3 // the daemon could not be asked (not running, the stream ended)
)

func newWaitCommand() *cobra.Command {
	var state string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "wait NAME --state STATE",
		Short: "Wait until an instance is in a state",
		Long: `Wait until the instance is in --state, following the daemon's events (no
polling). Exit status: 0 when it is, 1 when --timeout passes first, 2 when it
reaches Error or is deleted (it will not get there), 3 when the daemon cannot
be asked.`,
		Example: `  forkd wait web --state Running --timeout 30s
  forkd standby web & forkd wait web --state Standby`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !validState(state) {
				return fmt.Errorf("--state %q: want one of %s", state, strings.Join(states(), ", "))
			}
			c, err := NewClient(cmd)
			if err != nil {
				return &exitError{code: waitUnknown, err: err}
			}
			defer c.Close()
			ctx := cmd.Context()
			if timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
			}
			return waitFor(ctx, c, args[0], state, stdout(cmd))
		},
	}
	cmd.Flags().StringVar(&state, "state", "", "the state to wait for: "+strings.Join(states(), ", ")+" (required)")
	cmd.Flags().DurationVar(&timeout, "timeout", 0, "give up after this long, with exit status 1 (default: wait forever)")
	cmd.MarkFlagRequired("state")
	return cmd
}

func states() []string {
	return []string{api.StateCreated, api.StateRunning, api.StatePaused, api.StateStandby, api.StateStopped, api.StateError}
}

func validState(s string) bool {
	for _, x := range states() {
		if s == x {
			return true
		}
	}
	return false
}

// waitFor subscribes to events first, then reads the instance (so nothing
// between the read and the subscription is missed), and follows its events
// until it is in want, fails, or ctx ends.
func waitFor(ctx context.Context, c *api.Client, ref, want string, out io.Writer) error {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	evs, err := c.Events(sctx)
	if err != nil {
		return &exitError{code: waitUnknown, err: fmt.Errorf("wait: subscribe to events: %w", err)}
	}
	in, err := c.GetInstance(ctx, ref)
	if err != nil {
		if errors.Is(err, api.ErrNotFound) {
			return &exitError{code: waitFailed, err: fmt.Errorf("wait: instance %q does not exist", ref)}
		}
		return &exitError{code: waitUnknown, err: fmt.Errorf("wait: %w", err)}
	}
	check := func(state, errText string) error {
		switch {
		case state == want:
			fmt.Fprintf(out, "%s is %s\n", in.Name, state)
			return errReached
		case state == api.StateError:
			return &exitError{code: waitFailed, err: fmt.Errorf("wait: %s is in Error, not %s: %s", in.Name, want, errText)}
		}
		return nil
	}
	if err := check(in.State, in.Error); err != nil {
		return done(err)
	}
	for {
		select {
		case ev, ok := <-evs:
			if !ok {
				if ctx.Err() != nil {
					return timedOut(ctx, in.Name, want)
				}
				return &exitError{code: waitUnknown, err: fmt.Errorf("wait: %w", api.ErrStreamEnded)}
			}
			if ev.Instance == nil || ev.Instance.ID != in.ID {
				continue
			}
			if ev.Type == api.EventInstanceDeleted {
				return &exitError{code: waitFailed, err: fmt.Errorf("wait: %s was deleted before it was %s", in.Name, want)}
			}
			if ev.Type == api.EventInstanceError && ev.State != api.StateError {
				continue // a failed operation that left it where it was: keep waiting
			}
			if err := check(ev.State, ev.Error); err != nil {
				return done(err)
			}
		case <-ctx.Done():
			return timedOut(ctx, in.Name, want)
		}
	}
}

var errReached = errors.New("reached")

func done(err error) error {
	if errors.Is(err, errReached) {
		return nil
	}
	return err
}

func timedOut(ctx context.Context, name, want string) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return &exitError{code: waitTimedOut, err: fmt.Errorf("wait: %s is not %s after the timeout", name, want)}
	}
	return &exitError{code: waitUnknown, err: fmt.Errorf("wait: %w", ctx.Err())}
}

// exitError is an error with its own exit status.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }
