package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

// newServeCommand is `forkd serve`: the daemon. Owned by the foundation work
// (internal/daemon).
func newServeCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "serve",
		Short: "Run the forkd daemon",
		RunE: func(cmd *cobra.Command, args []string) error {
			return fmt.Errorf("forkd serve: not implemented yet")
		},
	}
}
