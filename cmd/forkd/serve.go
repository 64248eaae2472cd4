package main

import (
	"context"
	"errors"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/daemon"
)

// newServeCommand is `forkd serve`: the daemon (internal/daemon).
func newServeCommand() *cobra.Command {
	var profileDir string
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the forkd daemon",
		Long: `Run the forkd daemon in the foreground.

It serves the API on <data>/forkd.sock (mode 0600) and, with --listen, on a TCP
address that requires a bearer token. SIGTERM or SIGINT stops it: both
listeners stop at once, new changes get 503 shutting_down, operations in
flight get --shutdown-grace to finish, then it exits (what still runs is
finished or rolled back from the journal at the next start). A second signal
stops it at once. Running VMs are never stopped with it.

Configuration precedence: flags, then FORKD_* environment variables, then the
YAML file given by --config (or FORKD_CONFIG), then defaults.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) (err error) {
			cfg, err := daemon.LoadConfig(cmd.Flags(), os.LookupEnv)
			if err != nil {
				return err
			}
			if profileDir != "" {
				stopProfile, err := startProfile(profileDir)
				if err != nil {
					return err
				}
				defer func() { err = errors.Join(err, stopProfile()) }()
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, os.Interrupt)
			defer stop()
			// After the first signal a second one takes its default action:
			// an operator can always stop the daemon at once.
			context.AfterFunc(ctx, stop)
			return daemon.Run(ctx, cfg)
		},
	}
	daemon.BindFlags(cmd.Flags())
	cmd.Flags().StringVar(&profileDir, "profile", "", "write a CPU profile and an execution trace of the daemon into this directory (forkd-<pid>.cpu.pprof, forkd-<pid>.trace) until it exits")
	return cmd
}
