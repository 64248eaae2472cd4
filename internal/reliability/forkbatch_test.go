package reliability

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/instance"
	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/testenv"
)

// A fork batch (one call, N forks of one source, all or none) is run by a
// batch child: this test binary, re-executed, opens the stopped daemon's
// data dir with an instance.Manager set up as the daemon's (the forkd
// binary's emulator, jailed with the data dir's uid range) and runs one
// batch, with the crash or freeze hook armed in its environment. The
// daemon's API has no batch route yet; the child is the daemon for the
// span of the batch, and a real daemon starts after it to reconcile what it
// left and answer every check through the API. The child runs no
// network, so no batch case runs on a networked daemon
// (networkedCrashCases leaves them out).
const (
	// batchChildEnv makes this binary a batch child (batchChild) on the
	// data dir it names.
	batchChildEnv = "FORKD_RELIABILITY_BATCH_CHILD"
	// batchBinaryEnv is the forkd binary (the VMM emulator, its jailer).
	batchBinaryEnv = "FORKD_RELIABILITY_BATCH_BINARY"
	// batchFromEnv is what the batch forks: "instance" (src) or
	// "snapshot" (snap).
	batchFromEnv = "FORKD_RELIABILITY_BATCH_FROM"
	// batchCountEnv is how many forks it makes: kid-1..kid-N.
	batchCountEnv = "FORKD_RELIABILITY_BATCH_COUNT"
	// batchStopEnv, "1": once the batch is acknowledged, the child stops
	// itself (SIGSTOP) for the test to cut the power, as it would after a
	// daemon's answer.
	batchStopEnv = "FORKD_RELIABILITY_BATCH_STOP"
)

// batchChild runs the batch and reports it on stdout ("acked", or
// "failed: " and the error). Reaching its end is a failure of a crash case
// (the crash point was never reached): it exits 1.
func batchChild() int {
	dir, bin := os.Getenv(batchChildEnv), os.Getenv(batchBinaryEnv)
	uids, err := jail.ParseUIDRange(testenv.JailUIDRange(dir))
	if err != nil {
		fmt.Fprintln(os.Stderr, "batch child:", err)
		return 2
	}
	ctx := context.Background()
	m, err := instance.New(ctx, instance.Config{
		DataDir:     dir,
		VMM:         instance.VMMSpec{Binary: bin, Args: testenv.EmulatorArgs(), Emulator: true},
		Jail:        instance.JailConfig{Jailer: []string{bin, "jailer"}, UIDs: uids, MemoryOverhead: 256 << 20},
		PagerBinary: bin,
		Logger:      slog.New(slog.NewTextHandler(os.Stderr, nil)),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "batch child:", err)
		return 2
	}
	n, _ := strconv.Atoi(os.Getenv(batchCountEnv))
	req := api.ForkBatchRequest{Name: "kid", Count: n}
	if os.Getenv(batchFromEnv) == "snapshot" {
		_, err = m.ForkSnapshotBatch(ctx, "snap", req)
	} else {
		_, err = m.ForkInstanceBatch(ctx, "src", req)
	}
	if err != nil {
		fmt.Printf("failed: %v\n", err)
	} else {
		fmt.Println("acked")
	}
	if os.Getenv(batchStopEnv) == "1" {
		syscall.Kill(os.Getpid(), syscall.SIGSTOP)
		select {} // the test kills it
	}
	fmt.Fprintf(os.Stderr, "batch child: the batch returned (err %v) without reaching %s=%s\n", err, instance.CrashAtEnv, os.Getenv(instance.CrashAtEnv))
	return 1
}

// batchRun is a batch child the test started.
type batchRun struct {
	cmd      *exec.Cmd
	out, log bytes.Buffer
	exited   chan struct{}
}

// startBatch starts a batch child of n forks from from ("instance" or
// "snapshot") on stopped daemon d's data dir, with env added to its
// environment; stop: it stops itself once the batch is acknowledged.
// Cleanup kills it if it still runs.
func startBatch(t *testing.T, d *Daemon, from string, n int, stop bool, env []string) *batchRun {
	t.Helper()
	select {
	case <-d.Exited():
	default:
		t.Fatal("a batch child needs the daemon stopped")
	}
	b := &batchRun{exited: make(chan struct{})}
	b.cmd = exec.Command(os.Args[0])
	b.cmd.Env = append(os.Environ(), batchChildEnv+"="+d.Spec.DataDir, batchBinaryEnv+"="+forkdBinary(t),
		batchFromEnv+"="+from, batchCountEnv+"="+strconv.Itoa(n))
	if stop {
		b.cmd.Env = append(b.cmd.Env, batchStopEnv+"=1")
	}
	b.cmd.Env = append(b.cmd.Env, withEmulatorVersion(env)...)
	b.cmd.Stdout, b.cmd.Stderr = &b.out, &b.log
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { b.cmd.Wait(); close(b.exited) }()
	t.Cleanup(func() {
		b.cmd.Process.Kill()
		<-b.exited
	})
	return b
}

// wait waits up to timeout for the child to end and reports how.
func (b *batchRun) wait(timeout time.Duration) (syscall.WaitStatus, error) {
	select {
	case <-b.exited:
		return b.cmd.ProcessState.Sys().(syscall.WaitStatus), nil
	case <-time.After(timeout):
		return 0, fmt.Errorf("batch child pid %d still running after %v", b.cmd.Process.Pid, timeout)
	}
}

// crashBatch runs a crash case's batch: it must die by the hook's SIGKILL.
func crashBatch(t *testing.T, d *Daemon, tc crashCase, armed []string) {
	t.Helper()
	b := startBatch(t, d, tc.batchFrom, batchForks, false, armed)
	ws, err := b.wait(60 * time.Second)
	if err != nil || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("the batch child was not killed by the hook at %s (%v, %v): %s\n%s", tc.at, ws, err, b.out.String(), b.log.String())
	}
}

// batchForks is how many forks a crash case's batch makes.
const batchForks = 4

// batchCrashCases kill a batch of 4 forks of a Standby source (and one of
// a store snapshot) at each of its crash points: at the first fork's
// "begun" (its siblings' first commits may be made too), at
// "batch-files" (every dir renamed and made durable, every record
// Forking), at "batch-committing" (the batch's one last commit written,
// not committed) and at "batch-committed".
func batchCrashCases() []crashCase {
	standby := func(t *testing.T, c *api.Client) { createStandby(t, c, "src") }
	withSnapshot := func(t *testing.T, c *api.Client) {
		createStandby(t, c, "src")
		if _, err := c.CreateSnapshot(context.Background(), "src", api.SnapshotRequest{Name: "snap"}); err != nil {
			t.Fatal(err)
		}
	}
	var cases []crashCase
	for _, step := range []string{"begun", "batch-files", "batch-committing", "batch-committed"} {
		cases = append(cases, crashCase{at: "fork:" + step, variant: "batch-of-4", setup: standby, batchFrom: "instance",
			check: batchAllOrNone(step == "batch-committed")})
	}
	for _, step := range []string{"batch-files", "batch-committed"} {
		cases = append(cases, crashCase{at: "fork:" + step, variant: "batch-of-4-from-snapshot", setup: withSnapshot, batchFrom: "snapshot",
			check: batchAllOrNone(step == "batch-committed")})
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
			if in.State != api.StateStandby {
				t.Errorf("fork %s of the batch came back %s (error %q), want Standby", name, in.State, in.Error)
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
