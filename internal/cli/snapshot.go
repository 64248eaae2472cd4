package cli

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/api"
)

func newSnapshotCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "snapshot",
		Aliases: []string{"snap"},
		Short:   "Immutable snapshots: create, ls, inspect, rm, fork",
	}
	cmd.AddCommand(newSnapshotCreateCommand(), newSnapshotLsCommand(), newSnapshotInspectCommand(),
		newSnapshotRmCommand(), newSnapshotForkCommand())
	return cmd
}

func newSnapshotCreateCommand() *cobra.Command {
	var compression string
	cmd := &cobra.Command{
		Use:   "create INSTANCE [NAME]",
		Short: "Snapshot a Running, Paused or Standby instance into the store",
		Args:  cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := NewClient(cmd)
			if err != nil {
				return err
			}
			name := "snap-" + randomSuffix()
			if len(args) == 2 {
				name = args[1]
			}
			start := time.Now()
			snap, err := c.CreateSnapshot(cmd.Context(), args[0], api.SnapshotRequest{Name: name, Compression: compression})
			if err != nil {
				return withHint(err, api.ErrInvalidState, "only Running, Paused or Standby instances can be snapshotted; see `forkd ps`")
			}
			return printResult(cmd, snap, fmt.Sprintf("snapshot %s (%s) of %s: %s, %s in %s", snap.Name, shortID(snap.ID),
				args[0], humanBytes(snap.SizeBytes), snap.State, ms(time.Since(start))))
		},
	}
	cmd.Flags().StringVar(&compression, "compression", "", "none (default) or zstd (compressed in the background; forks still share it)")
	return cmd
}

func newSnapshotLsCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List snapshots",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runList(cmd, (*api.Client).ListSnapshots, printSnapshots)
		},
	}
}

func newSnapshotInspectCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "inspect REF",
		Short: "Show a snapshot as JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := NewClient(cmd)
			if err != nil {
				return err
			}
			snap, err := c.GetSnapshot(cmd.Context(), args[0])
			if err != nil {
				return withHint(err, api.ErrNotFound, "list snapshots with `forkd snapshot ls`")
			}
			return printJSON(stdout(cmd), snap)
		},
	}
}

func newSnapshotRmCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "rm REF...",
		Short: "Delete snapshots (forks made from them are unaffected)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return removeEach(cmd, "snapshot", args, func(c *api.Client, ctx context.Context, ref string) error {
				return withHint(c.DeleteSnapshot(ctx, ref), api.ErrNotFound, "list snapshots with `forkd snapshot ls`")
			})
		},
	}
}

func newSnapshotForkCommand() *cobra.Command {
	var o forkOptions
	cmd := &cobra.Command{
		Use:   "fork SNAPSHOT [NAME]",
		Short: "Make new instances from a snapshot (shares its memory file; no copy)",
		Long: `Make a new instance from a snapshot. It shares the snapshot's memory file (no
memory is copied) and is independent of it: deleting the snapshot does not affect it.

With --count N, N instances named NAME-1..NAME-N are made in one batch call: all
of them or, if any one fails, none; each is printed with the call's latency, and a
busy daemon (max_heavy_ops) makes the CLI retry the whole batch. With --separate
they are made with N concurrent single-fork calls instead, each with its own
latency and retries, keeping those that succeed.`,
		Example: `  forkd snapshot fork base web
  forkd snapshot fork base --count 25 --target-state Running    # one batch: 25 or none
  forkd snapshot fork base kid --count 25 --separate            # 25 concurrent single forks`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := NewClient(cmd)
			if err != nil {
				return err
			}
			name := ""
			if len(args) == 2 {
				name = args[1]
			} else {
				snap, err := c.GetSnapshot(cmd.Context(), args[0])
				if err != nil {
					return withHint(err, api.ErrNotFound, "list snapshots with `forkd snapshot ls`")
				}
				name = forkBaseName(snap.Name)
			}
			return runForks(cmd, o, name, forkCalls{
				one: func(ctx context.Context, req api.ForkRequest) (api.Instance, error) {
					return c.ForkSnapshot(ctx, args[0], req)
				},
				batch: func(ctx context.Context, req api.ForkBatchRequest) ([]api.Instance, error) {
					return c.ForkSnapshotBatch(ctx, args[0], req)
				},
			})
		},
	}
	o.bind(cmd, false)
	return cmd
}
