package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/api"
)

// jsonOutput reports whether -o json was asked for (and checks -o).
func jsonOutput(cmd *cobra.Command) (bool, error) {
	f := cmd.Flags().Lookup("output")
	if f == nil {
		return false, nil
	}
	switch v := f.Value.String(); v {
	case "json":
		return true, nil
	case "table", "":
		return false, nil
	default:
		return false, fmt.Errorf("--output %q: want table or json", v)
	}
}

// printJSONCompact writes v as one line of JSON.
func printJSONCompact(w io.Writer, v any) error {
	return json.NewEncoder(w).Encode(v)
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newTable(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 4, 2, ' ', 0) }

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// shortSource renders "instance:<id>" as "instance:<short id>".
func shortSource(s string) string {
	kind, id, ok := strings.Cut(s, ":")
	if !ok {
		return dash(s)
	}
	return kind + ":" + shortID(id)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func age(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := time.Since(t)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	default:
		return fmt.Sprintf("%dd", int(d.Hours()/24))
	}
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func printInstances(w io.Writer, list []api.Instance) error {
	list = append([]api.Instance(nil), list...)
	sort.SliceStable(list, func(a, b int) bool {
		if !list[a].CreatedAt.Equal(list[b].CreatedAt) {
			return list[a].CreatedAt.Before(list[b].CreatedAt)
		}
		return list[a].Name < list[b].Name
	})
	tw := newTable(w)
	fmt.Fprintln(tw, "ID\tNAME\tSTATE\tADDRESS\tVCPUS\tMEMORY\tSOURCE\tFORK MODE\tBACKEND\tMEMORY CHECK\tAGE")
	for _, i := range list {
		state := i.State
		if i.Error != "" {
			state += " (" + i.Error + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d MiB\t%s\t%s\t%s\t%s\t%s\n", shortID(i.ID), i.Name, state, dash(i.Network.Address), i.Vcpus,
			i.MemoryMiB, shortSource(i.Source), dash(i.ForkMode), dash(i.RestoreBackend), dash(i.MemoryCheck), age(i.CreatedAt))
	}
	return tw.Flush()
}

func printSnapshots(w io.Writer, list []api.Snapshot) error {
	tw := newTable(w)
	fmt.Fprintln(tw, "ID\tNAME\tSOURCE\tSIZE\tCOMPRESSION\tSTATE\tMEMORY\tAGE")
	for _, s := range list {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d MiB\t%s\n", shortID(s.ID), s.Name, shortID(s.SourceInstance),
			humanBytes(s.SizeBytes), dash(s.Compression), dash(s.State), s.MemoryMiB, age(s.CreatedAt))
	}
	return tw.Flush()
}

// percentile of sorted-in-place durations (nearest rank).
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(a, b int) bool { return s[a] < s[b] })
	i := int(p*float64(len(s))+0.5) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(s) {
		i = len(s) - 1
	}
	return s[i]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }
