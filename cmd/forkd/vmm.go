package main

import (
	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/emulator"
)

// newVMMCommand is `forkd vmm`: the KVM-less Firecracker-API emulator. Its
// command line is Firecracker's (--api-sock, --id, --log-path, --level), so
// flags are parsed by the emulator itself, not by cobra.
func newVMMCommand() *cobra.Command {
	return &cobra.Command{
		Use:                "vmm --api-sock PATH [--id ID] [--log-path P] [--level L]",
		Short:              "Run the KVM-less VMM emulator (speaks Firecracker's API)",
		DisableFlagParsing: true,
		SilenceUsage:       true,
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, a := range args {
				if a == "-h" || a == "--help" {
					return cmd.Help()
				}
			}
			return emulator.Main(cmd.Context(), args, cmd.ErrOrStderr())
		},
	}
}
