package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

// newVMMCommand is `forkd vmm`: the KVM-less Firecracker-API emulator.
// Owned by the emulator work (internal/emulator).
func newVMMCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "vmm",
		Short: "Run the KVM-less VMM emulator (speaks Firecracker's API)",
		RunE: func(cmd *cobra.Command, args []string) error {
			return fmt.Errorf("forkd vmm: not implemented yet")
		},
	}
}
