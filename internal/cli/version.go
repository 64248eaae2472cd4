package cli

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/version"
)

func newVersionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the client's and the daemon's versions",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			fmt.Fprintf(stdout(cmd), "client: %s\n", version.Version)
			c, err := NewClient(cmd)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 3*time.Second)
			defer cancel()
			h, err := c.Health(ctx)
			if err != nil {
				fmt.Fprintf(stdout(cmd), "daemon: unreachable at %s (%v)\n", c.Host(), err)
				return nil
			}
			fmt.Fprintf(stdout(cmd), "daemon: %s at %s\n", h.Version, c.Host())
			return nil
		},
	}
}
