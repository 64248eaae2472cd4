package cli

import (
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/api"
)

// NewClient returns the API client for cmd's --host / --token-file flags
// (or FORKD_HOST / FORKD_TOKEN_FILE, or the default socket). Commands built
// outside this package (bench) use it too.
func NewClient(cmd *cobra.Command) (*api.Client, error) {
	flag := func(name string) string {
		if f := cmd.Flags().Lookup(name); f != nil {
			return f.Value.String()
		}
		return ""
	}
	host := api.ResolveHost(flag("host"), os.LookupEnv)
	tokenFile := flag("token-file")
	if tokenFile == "" {
		tokenFile = os.Getenv("FORKD_TOKEN_FILE")
	}
	var opts []api.ClientOption
	if tokenFile != "" {
		b, err := os.ReadFile(tokenFile)
		if err != nil {
			return nil, fmt.Errorf("read token file: %w", err)
		}
		opts = append(opts, api.WithToken(strings.TrimSpace(string(b))))
	}
	return api.NewClient(host, opts...)
}
