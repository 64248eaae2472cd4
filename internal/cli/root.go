// Package cli holds forkd's client commands. They talk to the daemon only
// through the typed API client (internal/api): never to the store, the
// manager or the filesystem of the data dir. Output is a table for people
// and JSON with -o json; errors go to stderr with a hint of what to do next.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/version"
)

// Extensions are the commands built outside this package, which the root
// command mounts: the process roles (`serve`, `vmm`, `jailer`, `pager serve`)
// and the host preflight (`doctor`) from cmd/forkd, and `bench fork-burst`
// from internal/bench. A nil one is left
// out.
type Extensions struct {
	Serve          *cobra.Command
	VMM            *cobra.Command
	PagerServe     *cobra.Command
	Jailer         *cobra.Command
	BenchForkBurst *cobra.Command
	BenchList      *cobra.Command
	Doctor         *cobra.Command
}

// NewRootCommand builds the `forkd` command tree.
func NewRootCommand(ext Extensions) *cobra.Command {
	root := &cobra.Command{
		Use:   "forkd",
		Short: "forkd manages Firecracker microVMs: instant standby, restore and fork",
		Long: `forkd manages Firecracker microVMs on one Linux host, built around three
operations that are near-instant and never unsafe: standby (park a VM to disk),
restore (wake it) and fork (turn one VM or snapshot into many).

Start the daemon with 'forkd serve'; every other command talks to it.`,
		Version:       version.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	pf := root.PersistentFlags()
	pf.String("host", "", "daemon address: a socket path, unix://PATH, tcp://HOST:PORT or https://HOST:PORT (env FORKD_HOST; default <data>/forkd.sock)")
	pf.String("token-file", "", "file with the bearer token for a tcp:// or https:// host (env FORKD_TOKEN_FILE)")
	pf.String("tls-ca", "", "PEM certificate(s) to trust for an https:// host, e.g. the daemon's own tls_cert (env FORKD_TLS_CA; default: the system's roots)")
	pf.StringP("output", "o", "table", "output format: table or json")

	root.AddGroup(
		&cobra.Group{ID: "vm", Title: "Instances:"},
		&cobra.Group{ID: "snap", Title: "Snapshots and forks:"},
		&cobra.Group{ID: "host", Title: "Daemon and host:"},
	)
	add := func(group string, cmds ...*cobra.Command) {
		for _, c := range cmds {
			c.GroupID = group
			root.AddCommand(c)
		}
	}
	add("vm", newRunCommand(), newPsCommand(), newInspectCommand(), newRmCommand(), newWaitCommand())
	for _, a := range actionCommands() {
		add("vm", a)
	}
	add("snap", newForkCommand(), newSnapshotCommand())
	add("vm", newImageCommand())

	pager := &cobra.Command{Use: "pager", Short: "The userfaultfd pager"}
	pager.AddCommand(newPagerStatsCommand())
	if ext.PagerServe != nil {
		pager.AddCommand(ext.PagerServe)
	}
	bench := &cobra.Command{Use: "bench", Short: "Benchmarks against a running daemon"}
	for _, c := range []*cobra.Command{ext.BenchForkBurst, ext.BenchList} {
		if c != nil {
			bench.AddCommand(c)
		}
	}
	add("host", pager, bench, newEventsCommand(), newDemoCommand(), newVersionCommand())
	for _, c := range []*cobra.Command{ext.Serve, ext.VMM, ext.Jailer, ext.Doctor} {
		if c != nil {
			add("host", c)
		}
	}
	root.SetHelpCommandGroupID("host")
	root.SetCompletionCommandGroupID("host")
	return root
}

// Execute runs root and turns an error into a message on stderr (with a
// hint of what to do next) and a non-zero exit code.
func Execute(ctx context.Context, root *cobra.Command) int {
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	printError(root.ErrOrStderr(), err)
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	return 1
}

func printError(w io.Writer, err error) {
	fmt.Fprintf(w, "forkd: %v\n", err)
	if h := hintFor(err); h != "" {
		fmt.Fprintf(w, "hint: %s\n", h)
	}
}

// stdout and stderr of a command.
func stdout(cmd *cobra.Command) io.Writer { return cmd.OutOrStdout() }
