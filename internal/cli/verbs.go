package cli

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/api"
)

// The verbs every kind of object has (instances, snapshots, images) take
// the same shape: ls prints a table or, with -o json, the list; inspect
// prints one object or an array of them; rm deletes each ref it is given
// and goes on past a failure.

// clientFor checks -o and returns the API client: the start of every
// command that prints a table or JSON (a bad -o fails before the daemon is
// asked anything).
func clientFor(cmd *cobra.Command) (c *api.Client, asJSON bool, err error) {
	if asJSON, err = jsonOutput(cmd); err != nil {
		return nil, false, err
	}
	c, err = NewClient(cmd)
	return c, asJSON, err
}

// runList runs an ls command: list asks the daemon, table draws the answer
// for people; -o json prints it as a JSON array ([] when empty, never null).
func runList[T any](cmd *cobra.Command, list func(*api.Client, context.Context) ([]T, error), table func(io.Writer, []T) error) error {
	c, asJSON, err := clientFor(cmd)
	if err != nil {
		return err
	}
	items, err := list(c, cmd.Context())
	if err != nil {
		return err
	}
	if asJSON {
		if items == nil {
			items = []T{}
		}
		return printJSON(stdout(cmd), items)
	}
	return table(stdout(cmd), items)
}

// printOneOrMany prints what an inspect of one or more refs found: one
// object as itself, several as an array.
func printOneOrMany[T any](cmd *cobra.Command, found []T) error {
	if len(found) == 1 {
		return printJSON(stdout(cmd), found[0])
	}
	return printJSON(stdout(cmd), found)
}

// removeEach runs `[KIND] rm REF...`: del deletes one ref (its error
// carries the hints), "removed [KIND ]REF" is printed for each one deleted,
// and the failures, each named "[KIND ]rm REF", are joined.
func removeEach(cmd *cobra.Command, kind string, refs []string, del func(c *api.Client, ctx context.Context, ref string) error) error {
	c, err := NewClient(cmd)
	if err != nil {
		return err
	}
	if kind != "" {
		kind += " "
	}
	var errs []error
	for _, ref := range refs {
		if err := del(c, cmd.Context(), ref); err != nil {
			errs = append(errs, fmt.Errorf("%srm %s: %w", kind, ref, err))
			continue
		}
		fmt.Fprintf(stdout(cmd), "removed %s%s\n", kind, ref)
	}
	return errors.Join(errs...)
}
