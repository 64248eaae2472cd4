package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

// newPagerServeCommand is `forkd pager serve`: the host's userfaultfd pager.
// Owned by the pager work (internal/pager).
func newPagerServeCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "serve",
		Short: "Run the userfaultfd pager for this version",
		RunE: func(cmd *cobra.Command, args []string) error {
			return fmt.Errorf("forkd pager serve: not implemented yet")
		},
	}
}
