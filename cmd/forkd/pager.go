package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/pager"
	"github.com/forkd/forkd/internal/version"
)

// newPagerServeCommand is `forkd pager serve`: the host's userfaultfd pager
// (internal/pager). The daemon starts it detached through
// pager.EnsureRunning and compares its --version with its own.
func newPagerServeCommand() *cobra.Command {
	opt := pager.MainOptions{Version: version.Version}
	var printVersion bool
	cmd := &cobra.Command{
		Use:   "serve --dir DIR [--cache-bytes N] [--log-path P] [--log-format text|json]",
		Short: "Run the userfaultfd pager for this version",
		Long: `Run the userfaultfd pager: it serves the guest memory of VMs restored with
Firecracker's Uffd backend from a page cache shared by every VM of a snapshot.

The control API listens on DIR/control.sock. The first SIGTERM drains (new
sessions are refused; the pager exits after the last VM); a second stops it at
once, which freezes VMs it still serves.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if printVersion {
				fmt.Fprintln(cmd.OutOrStdout(), version.Version)
				return nil
			}
			opt.Stderr = cmd.ErrOrStderr()
			return pager.Main(cmd.Context(), opt)
		},
	}
	f := cmd.Flags()
	f.StringVar(&opt.Dir, "dir", "", "pager directory, <data>/pager/<version> (required)")
	f.Int64Var(&opt.CacheBytes, "cache-bytes", 512<<20, "page cache budget in bytes (0 disables the cache)")
	f.StringVar(&opt.LogPath, "log-path", "", "append logs to this file (default stderr)")
	f.StringVar(&opt.LogFormat, "log-format", "text", "log format: text or json")
	f.BoolVar(&printVersion, "version", false, "print the pager's version and exit")
	return cmd
}
