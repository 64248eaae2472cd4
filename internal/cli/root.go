// Package cli holds forkd's client commands. They talk to the daemon only
// through the typed API client (internal/api).
package cli

import "github.com/spf13/cobra"

// Extensions are the process-role commands built in cmd/forkd, which the
// root command mounts: `serve`, `vmm`, and `pager serve`.
type Extensions struct {
	Serve      *cobra.Command
	VMM        *cobra.Command
	PagerServe *cobra.Command
}

// NewRootCommand builds the `forkd` command tree.
func NewRootCommand(ext Extensions) *cobra.Command {
	root := &cobra.Command{
		Use:           "forkd",
		Short:         "forkd manages Firecracker microVMs: instant standby, restore and fork",
		SilenceUsage:  true,
		SilenceErrors: false,
	}
	pager := &cobra.Command{Use: "pager", Short: "The userfaultfd pager"}
	for _, c := range []*cobra.Command{ext.PagerServe} {
		if c != nil {
			pager.AddCommand(c)
		}
	}
	root.AddCommand(pager)
	for _, c := range []*cobra.Command{ext.Serve, ext.VMM} {
		if c != nil {
			root.AddCommand(c)
		}
	}
	return root
}
