package cli

import (
	"bytes"
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"
)

func newPagerStatsCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "stats",
		Short: "Show the pager's statistics (hits, misses, faults, backing reads, per session)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, asJSON, err := clientFor(cmd)
			if err != nil {
				return err
			}
			raw, err := c.PagerStats(cmd.Context())
			if err != nil {
				return err
			}
			if !asJSON {
				if hits, misses, ok := hitsMisses(raw); ok && hits+misses > 0 {
					fmt.Fprintf(stdout(cmd), "hit rate %.1f%% (%d hits, %d misses)\n", 100*float64(hits)/float64(hits+misses), hits, misses)
				}
			}
			var buf bytes.Buffer
			if err := json.Indent(&buf, raw, "", "  "); err != nil {
				return fmt.Errorf("pager stats: %w", err)
			}
			buf.WriteByte('\n')
			_, err = stdout(cmd).Write(buf.Bytes())
			return err
		},
	}
}

// hitsMisses finds the pager's global hit and miss counters, at the top
// level or under "global".
func hitsMisses(raw []byte) (hits, misses int64, ok bool) {
	var doc map[string]json.RawMessage
	if json.Unmarshal(raw, &doc) != nil {
		return 0, 0, false
	}
	if g, found := doc["global"]; found {
		var inner map[string]json.RawMessage
		if json.Unmarshal(g, &inner) == nil {
			doc = inner
		}
	}
	h, okH := doc["hits"]
	m, okM := doc["misses"]
	if !okH || !okM || json.Unmarshal(h, &hits) != nil || json.Unmarshal(m, &misses) != nil {
		return 0, 0, false
	}
	return hits, misses, true
}
