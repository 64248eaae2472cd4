// Command forkd is one binary for the daemon, the CLI, the pager and the
// KVM-less VMM emulator. Each role is a cobra subcommand; the process roles
// (serve, vmm, pager serve) are wired here, the client commands live in
// internal/cli.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/forkd/forkd/internal/cli"
	"github.com/forkd/forkd/internal/emulator"
)

// VMMName is the name under which this binary is the VMM: a jailer execs
// /<exec-file name> --id ID ... -- ARGS, exactly as it execs Firecracker,
// so a jail holding this binary as forkd-vmm runs `forkd vmm ID... ARGS`.
const VMMName = "forkd-vmm"

func main() {
	if filepath.Base(os.Args[0]) == VMMName {
		if err := emulator.Main(context.Background(), os.Args[1:], os.Stderr); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	// The jailer runs at every jailed VMM launch: straight to it, before
	// the command tree is built (help goes through cobra, below).
	if len(os.Args) > 1 && os.Args[1] == "jailer" && !wantsHelp(os.Args[2:]) {
		// runJailer returns only if it could not exec the VMM.
		fmt.Fprintln(os.Stderr, "forkd jailer:", runJailer(os.Args[2:]))
		os.Exit(1)
	}
	root := cli.NewRootCommand(cli.Extensions{
		Serve:      newServeCommand(),
		VMM:        newVMMCommand(),
		PagerServe: newPagerServeCommand(),
		Jailer:     newJailerCommand(),
		Doctor:     newDoctorCommand(),

		BenchForkBurst: newBenchForkBurstCommand(),
		BenchList:      newBenchListCommand(),
	})
	os.Exit(cli.Execute(context.Background(), root))
}
