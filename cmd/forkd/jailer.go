package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/jail"
)

// newJailerCommand is `forkd jailer`: Firecracker's jailer contract (its
// command line and what it does before it execs the VMM), for the emulator
// and for hosts without the real jailer. Flags are the jailer's own, parsed
// by package jail, not by cobra.
func newJailerCommand() *cobra.Command {
	return &cobra.Command{
		Use: "jailer --id ID --exec-file PATH --uid UID --gid GID [--chroot-base-dir DIR] [--netns PATH]\n" +
			"  [--cgroup-version 1|2] [--cgroup FILE=VALUE]... [--parent-cgroup PATH]\n" +
			"  [--resource-limit fsize|no-file=N]... [-- VMM ARGS...]",
		Short:              "Confine a VMM and exec it (Firecracker's jailer contract)",
		DisableFlagParsing: true,
		SilenceUsage:       true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if wantsHelp(args) {
				return cmd.Help()
			}
			return runJailer(args)
		},
	}
}

// runJailer is `forkd jailer ARGS`. main runs it before anything else (no
// command tree is built): every VMM launch pays for this process's start,
// so it does only what the jail needs.
func runJailer(args []string) error {
	a, err := jail.Parse(args)
	if err != nil {
		return fmt.Errorf("%w (see forkd jailer --help)", err)
	}
	return jail.Run(a, jail.Options{CopyExec: os.Getenv(jail.EnvCopyExec) == "1", Warn: os.Stderr})
}

// wantsHelp reports whether the jailer's own arguments (those before "--")
// ask for help.
func wantsHelp(args []string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		if a == "-h" || a == "--help" {
			return true
		}
	}
	return false
}
