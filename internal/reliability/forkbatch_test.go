package reliability

import (
	"context"
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// A fork batch (one call, N forks of one source, all or none) is a
// crash case like any other: the daemon, started with the crash hook armed,
// gets the batch over its API (POST /instances/src/forks or
// /snapshots/snap/forks) and dies at the hook; its restart reconciles what
// the batch left. The power-loss cases freeze the daemon the same way
// (powerloss_test.go).

// forkBatchOf is an op that asks the daemon for a batch of n forks,
// kid-1..kid-n, of instance src (from "instance") or snapshot snap
// ("snapshot").
func forkBatchOf(from string, n int) func(ctx context.Context, c *api.Client) error {
	return func(ctx context.Context, c *api.Client) error {
		req := api.ForkBatchRequest{Name: "kid", Count: n}
		var err error
		if from == "snapshot" {
			_, err = c.ForkSnapshotBatch(ctx, "snap", req)
		} else {
			_, err = c.ForkInstanceBatch(ctx, "src", req)
		}
		return err
	}
}

// batchForks is how many forks a crash case's batch makes.
const batchForks = 4

// batchCrashCases kill a batch of 4 forks of a Standby source (and one of
// a store snapshot) at each of its crash points: at the first fork's
// "begun" (its siblings' first commits may be made too), at
// "batch-renaming" (one dir under its own name, the others not: none kept),
// at "batch-files" (every dir renamed and made durable, every record
// Forking: the reconciler completes them all), at "batch-committing" (the
// batch's last commit written, not committed) and at "batch-committed".
func batchCrashCases() []crashCase {
	standby := func(t *testing.T, c *api.Client) { createStandby(t, c, "src") }
	withSnapshot := func(t *testing.T, c *api.Client) {
		createStandby(t, c, "src")
		if _, err := c.CreateSnapshot(context.Background(), "src", api.SnapshotRequest{Name: "snap"}); err != nil {
			t.Fatal(err)
		}
	}
	var cases []crashCase
	kept := func(step string) bool { return step != "begun" && step != "batch-renaming" }
	for _, step := range []string{"begun", "batch-renaming", "batch-files", "batch-committing", "batch-committed"} {
		cases = append(cases, crashCase{at: "fork:" + step, variant: "batch-of-4", setup: standby, op: forkBatchOf("instance", batchForks),
			check: batchAllOrNone(kept(step))})
	}
	for _, step := range []string{"batch-renaming", "batch-files", "batch-committed"} {
		cases = append(cases, crashCase{at: "fork:" + step, variant: "batch-of-4-from-snapshot", setup: withSnapshot, op: forkBatchOf("snapshot", batchForks),
			check: batchAllOrNone(kept(step))})
	}
	return cases
}

// batchAllOrNone checks a batch after the crash and the restart: every fork
// of it, Standby with its snapshot in place (kept), or none (the reconciler
// removed them all; the invariants then find no dir or temp dir of them).
// Exercise restores every fork kept and checks its memory; the crash case
// checks the source is untouched.
func batchAllOrNone(kept bool) func(t *testing.T, d *Daemon) {
	return func(t *testing.T, d *Daemon) {
		got := 0
		for i := range batchForks {
			name := fmt.Sprintf("kid-%d", i+1)
			in, err := d.Client.GetInstance(ctxT(t, 10*time.Second), name)
			if errors.Is(err, api.ErrNotFound) {
				continue
			}
			if err != nil {
				t.Fatalf("get %s: %v", name, err)
			}
			got++
			if in.State != api.StateStandby || in.ForkMode != "hardlink" {
				t.Errorf("fork %s of the batch came back %s, fork_mode %q (error %q), want Standby, hardlink", name, in.State, in.ForkMode, in.Error)
			}
			g, err := d.Layout.Guest(in.ID)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{g.Latest().Memory(), g.Latest().VMState(), g.Rootfs()} {
				if _, err := os.Stat(p); err != nil {
					t.Errorf("fork %s of the batch: %v", name, err)
				}
			}
		}
		want := 0
		if kept {
			want = batchForks
		}
		if got != want {
			t.Errorf("%d forks of a batch of %d came back, want %d (all or none, never part of a batch)", got, batchForks, want)
		}
		if in, err := d.Client.GetInstance(ctxT(t, 10*time.Second), "src"); err != nil || in.State != api.StateStandby {
			t.Errorf("the batch's source after the crash: %+v, %v; want Standby", in, err)
		}
	}
}
