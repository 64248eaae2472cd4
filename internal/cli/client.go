package cli

import (
	"crypto/x509"
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
		tok := strings.TrimSpace(string(b))
		if strings.Contains(tok, "\n") {
			return nil, fmt.Errorf("token file %s holds more than one line; the token is one line", tokenFile)
		}
		opts = append(opts, api.WithToken(tok))
	}
	caFile := flag("tls-ca")
	if caFile == "" {
		caFile = os.Getenv("FORKD_TLS_CA")
	}
	if caFile != "" {
		b, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("read --tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("--tls-ca %s holds no PEM certificate", caFile)
		}
		opts = append(opts, api.WithRootCAs(pool))
	}
	return api.NewClient(host, opts...)
}
