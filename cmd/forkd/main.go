// Command forkd is one binary for the daemon, the CLI, the pager and the
// KVM-less VMM emulator. Each role is a cobra subcommand; the process roles
// (serve, vmm, pager serve) are wired here, the client commands live in
// internal/cli.
package main

import (
	"context"
	"os"

	"github.com/forkd/forkd/internal/cli"
)

func main() {
	root := cli.NewRootCommand(cli.Extensions{
		Serve:      newServeCommand(),
		VMM:        newVMMCommand(),
		PagerServe: newPagerServeCommand(),

		BenchForkBurst: newBenchForkBurstCommand(),
	})
	os.Exit(cli.Execute(context.Background(), root))
}
