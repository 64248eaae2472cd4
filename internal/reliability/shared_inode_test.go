package reliability

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// TestNoVMWritesAnInodeARunningSiblingMaps is the scenario the concurrency
// stress found: a source and its fork both run on File restores of one
// mem-file inode I (the fork's hardlink). A live snapshot (or live fork) of
// the source unshares the source's base (nlink 2) into a new inode and
// diff-writes there, but the source's VMM keeps mapping I, which now has a
// single link, the fork's. The fork's next standby then sees nlink 1 and
// diff-writes I in place: pages under the still-running source change, and
// its guest reads another lineage's data (a memory integrity error). Every
// VM must keep memory_check ok.
func TestNoVMWritesAnInodeARunningSiblingMaps(t *testing.T) {
	t.Parallel()
	for _, live := range []string{"live snapshot", "live fork"} {
		t.Run(live, func(t *testing.T) {
			t.Parallel()
			d := newDaemon(t, nil)
			c := d.Client
			createStandby(t, c, "src")
			if _, err := c.ForkInstance(ctxT(t, 30*time.Second), "src", api.ForkRequest{Name: "kid"}); err != nil {
				t.Fatal(err)
			}
			action(t, c, "src", "restore")
			action(t, c, "kid", "restore")
			waitGuestWork(t, d, "kid", 30)
			switch live {
			case "live snapshot":
				if _, err := c.CreateSnapshot(ctxT(t, 30*time.Second), "src", api.SnapshotRequest{Name: "snap"}); err != nil {
					t.Fatal(err)
				}
			case "live fork":
				if _, err := c.ForkInstance(ctxT(t, 30*time.Second), "src", api.ForkRequest{Name: "kid2", FromRunning: true}); err != nil {
					t.Fatal(err)
				}
			}
			waitGuestWork(t, d, "kid", 30) // kid dirties pages
			if in := action(t, c, "kid", "standby"); in.MemoryCheck != "ok" {
				t.Errorf("kid at standby: memory_check %q", in.MemoryCheck)
			}
			addFigure("faults_injected", 1)
			waitGuestWork(t, d, "src", 120) // src reads (and writes) its working set
			in, err := c.GetInstance(ctxT(t, 10*time.Second), "src")
			if err != nil {
				t.Fatal(err)
			}
			if in.MemoryCheck != "ok" {
				t.Errorf("after its fork's standby, the running source reports %q: a sibling wrote the inode it maps", in.MemoryCheck)
			}
			checkAll(t, d)
		})
	}
}

// TestAForkActedOnBeforeItsTargetStateIsKept races a fork with
// target_state Running against a second client that restores the new fork
// the moment it appears (Standby, between the fork and its first restore).
// Whoever wins, the fork must end Running and must never be deleted from
// under the client that restored it.
func TestAForkActedOnBeforeItsTargetStateIsKept(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil)
	c := d.Client
	createStandby(t, c, "src")
	for i := 0; i < 15; i++ {
		name := fmt.Sprintf("kid-%d", i)
		done := make(chan error, 1)
		go func() {
			_, err := c.ForkInstance(context.Background(), "src", api.ForkRequest{Name: name, TargetState: api.StateRunning})
			done <- err
		}()
		var forkErr error
		restored := false
	poll:
		for {
			select {
			case forkErr = <-done:
				break poll
			default:
			}
			if in, err := c.GetInstance(context.Background(), name); err == nil && in.State == api.StateStandby && !restored {
				if _, err := c.Action(context.Background(), name, "restore", api.ActionRequest{}); err == nil {
					restored = true
				}
			}
		}
		in, err := c.GetInstance(context.Background(), name)
		if err != nil || in.State != api.StateRunning {
			t.Errorf("round %d (second client restored it first: %v): fork call returned %v; the fork is now %+v, %v", i, restored, forkErr, in.State, err)
		}
	}
	checkAll(t, d)
}
