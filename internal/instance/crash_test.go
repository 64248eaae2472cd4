package instance

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/memfile"
	"github.com/forkd/forkd/internal/testenv"
)

// crashDirEnv makes this test binary a crash helper (see crashHelper).
const crashDirEnv = "FORKD_CRASH_DIR"

// crashHelper is the "daemon" that crash tests run in a child process (the
// re-executed test binary, from TestMain) and SIGKILL at one journalled step
// of one operation (crashhook.go's FORKD_TEST_CRASH_AT). Reaching its end is
// a failure: the crash point was never reached.
func crashHelper() int {
	uids, _ := jail.ParseUIDRange(testenv.JailUIDRange(os.Getenv(crashDirEnv)))
	m, err := New(context.Background(), Config{
		DataDir: os.Getenv(crashDirEnv),
		VMM:     VMMSpec{Binary: os.Getenv("FORKD_CRASH_VMM"), Args: testenv.EmulatorArgs(), Emulator: true},
		Jail:    JailConfig{Jailer: []string{os.Getenv("FORKD_CRASH_VMM"), "jailer"}, UIDs: uids, MemoryOverhead: 256 << 20},
		Logger:  slog.New(slog.NewTextHandler(os.Stderr, nil)),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "crash helper:", err)
		return 2
	}
	ctx := context.Background()
	ref := os.Getenv("FORKD_CRASH_REF")
	switch op := os.Getenv("FORKD_CRASH_OP"); op {
	case "fork":
		_, err = m.ForkInstance(ctx, ref, api.ForkRequest{Name: "crashfork"})
	case "forkbatch": // a batch of crashBatch forks, crashfork-1..crashfork-N
		_, err = m.ForkInstanceBatch(ctx, ref, api.ForkBatchRequest{Name: "crashfork", Count: crashBatch})
	case "livefork":
		_, err = m.ForkInstance(ctx, ref, api.ForkRequest{Name: "crashfork", FromRunning: true})
	case "snapshot":
		_, err = m.CreateSnapshot(ctx, ref, api.SnapshotRequest{Name: "crashsnap"})
	case "zsnapshot":
		// The crash point is in the background compression: wait for it
		// (the compression ends in the crash, or the parent's timeout ends
		// this process).
		if _, err = m.CreateSnapshot(ctx, ref, api.SnapshotRequest{Name: "crashsnap", Compression: "zstd"}); err == nil {
			select {}
		}
	default:
		_, err = m.Action(ctx, ref, op, api.ActionRequest{})
	}
	fmt.Fprintf(os.Stderr, "crash helper: %s %s finished (err %v) without reaching %s=%s\n", os.Getenv("FORKD_CRASH_OP"), ref, err, CrashAtEnv, os.Getenv(CrashAtEnv))
	return 1
}

// Kill -9 of the daemon in the middle of an operation, then a restart: the
// reconciler leaves every instance in a settled, usable state with nothing
// half-made on disk.
func TestCrashMidOperationRecovers(t *testing.T) {
	for _, tc := range []struct {
		name     string
		srcState string // state of "src" before the crash
		op, kind string
		step     string
		wantSrc  string // src's state after the restart
		wantFork bool   // whether "crashfork" exists after the restart
		wantSnap bool
	}{
		{"standby before the snapshot", api.StateRunning, "standby", "standby", "creating", api.StateRunning, false, false},
		{"standby after the snapshot", api.StateRunning, "standby", "standby", "created", api.StateStandby, false, false},
		{"restore after launch", api.StateStandby, "restore", "restore", "launched", api.StateStandby, false, false},
		{"restore after resume", api.StateStandby, "restore", "restore", "resumed", api.StateRunning, false, false},
		// A fork's dir in place under its own name is complete and durable:
		// the reconciler completes the fork its last commit did not.
		{"fork with files made", api.StateStandby, "fork", "fork", "files", api.StateStandby, true, false},
		{"fork recorded, not committed", api.StateStandby, "fork", "fork", "committing", api.StateStandby, true, false},
		{"fork committed", api.StateStandby, "fork", "fork", "committed", api.StateStandby, true, false},
		{"live fork mid-diff", api.StateRunning, "livefork", "fork", "creating", api.StateRunning, false, false},
		{"live fork with files made", api.StateRunning, "livefork", "fork", "files", api.StateRunning, false, false},
		{"live snapshot paused", api.StateRunning, "snapshot", "snapshot", "paused", api.StateRunning, false, false},
		{"live snapshot stored", api.StateRunning, "snapshot", "snapshot", "stored", api.StateRunning, false, true},
		{"compression written", api.StateRunning, "zsnapshot", "compress", "compressed", api.StateRunning, false, true},
		{"compression raw removed", api.StateRunning, "zsnapshot", "compress", "raw-removed", api.StateRunning, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortDir(t)
			var src api.Instance
			openAndClose(t, dir, func(m *Manager) {
				src = createRunning(t, m, "src")
				if tc.srcState == api.StateStandby {
					action(t, m, "src", "standby")
				}
			})
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0])
			cmd.Env = append(os.Environ(), crashDirEnv+"="+dir, "FORKD_CRASH_VMM="+forkdBinary(t),
				"FORKD_CRASH_OP="+tc.op, CrashAtEnv+"="+tc.kind+":"+tc.step, "FORKD_CRASH_REF=src")
			out, err := cmd.CombinedOutput()
			// The restarted "daemon": its cleanup deletes every instance, so
			// no VMM outlives the test even when the helper did not crash.
			m := newManagerAt(t, dir)
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("helper was not killed at %s/%s: %v\n%s", tc.kind, tc.step, err, out)
			}
			ctx = context.Background()
			in, err := m.GetInstance(ctx, "src")
			if err != nil {
				t.Fatal(err)
			}
			if in.State != tc.wantSrc {
				t.Fatalf("src after crash + restart: %s (error %q), want %s", in.State, in.Error, tc.wantSrc)
			}
			if open, _ := m.db.OpenEntries(ctx); len(open) != 0 {
				t.Errorf("%d journal entries still open", len(open))
			}
			_, ferr := m.GetInstance(ctx, "crashfork")
			if (ferr == nil) != tc.wantFork {
				t.Errorf("fork exists = %v, want %v", ferr == nil, tc.wantFork)
			}
			_, serr := m.GetSnapshot(ctx, "crashsnap")
			if (serr == nil) != tc.wantSnap {
				t.Errorf("snapshot exists = %v, want %v", serr == nil, tc.wantSnap)
			}
			for _, root := range []string{m.layout.JailsDir(), m.layout.SnapshotsDir()} {
				ents, _ := os.ReadDir(root)
				for _, e := range ents {
					if strings.HasPrefix(e.Name(), ".tmp-") {
						t.Errorf("half-made dir left: %s", filepath.Join(root, e.Name()))
					}
				}
			}
			// Whatever state src settled in, it works from there.
			switch in.State {
			case api.StateRunning:
				verifyGuest(t, m, src.ID)
				action(t, m, "src", "standby")
				action(t, m, "src", "restore")
			case api.StateStandby:
				action(t, m, "src", "restore")
			}
			verifyGuest(t, m, src.ID)
			if tc.wantFork {
				f := action(t, m, "crashfork", "restore")
				verifyGuest(t, m, f.ID)
			}
			if tc.wantSnap {
				if tc.op == "zsnapshot" { // the restarted compression finishes
					waitSnapshotState(t, m, "crashsnap", snapCompressed)
				}
				f, err := m.ForkSnapshot(ctx, "crashsnap", api.ForkRequest{Name: "fromsnap", TargetState: api.StateRunning})
				if err != nil {
					t.Fatal(err)
				}
				verifyGuest(t, m, f.ID)
			}
		})
	}
}

func waitSnapshotState(t *testing.T, m *Manager, ref, state string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		sn, err := m.GetSnapshot(context.Background(), ref)
		if err != nil {
			t.Fatal(err)
		}
		if sn.State == state {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("snapshot %s is %s after 30 s, want %s", ref, sn.State, state)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// crashBatch is how many forks the crash helper's "forkbatch" makes.
const crashBatch = 4

// A batch of forks killed at each of its crash points is all or none after
// the restart: before every fork's dir is under its own name no fork of it
// exists (no record, no dir, no temp dir, its journal entries closed);
// after, every fork is Standby with its files in place and the fork_mode
// its mem-file has (the reconciler completes a batch whose last commit did
// not happen), restores and verifies its memory; the source is untouched.
func TestCrashMidForkBatchIsAllOrNone(t *testing.T) {
	for _, tc := range []struct {
		step string
		kept bool
	}{
		{"begun", false},          // the first fork's first commit; its siblings' may be made too
		{"batch-renaming", false}, // one dir under its own name, the others not
		{"batch-files", true},     // every dir in place: the reconciler completes the batch
		{"batch-committing", true},
		{"batch-committed", true},
	} {
		t.Run(tc.step, func(t *testing.T) {
			dir := shortDir(t)
			var src api.Instance
			var srcMem fileID
			openAndClose(t, dir, func(m *Manager) {
				src = createRunning(t, m, "src")
				action(t, m, "src", "standby")
				srcMem = fingerprint(t, latestMem(t, m, src.ID))
			})
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0])
			cmd.Env = append(os.Environ(), crashDirEnv+"="+dir, "FORKD_CRASH_VMM="+forkdBinary(t),
				"FORKD_CRASH_OP=forkbatch", CrashAtEnv+"=fork:"+tc.step, "FORKD_CRASH_REF=src")
			out, err := cmd.CombinedOutput()
			m := newManagerAt(t, dir)
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("helper was not killed at fork:%s: %v\n%s", tc.step, err, out)
			}
			ctx = context.Background()
			if open, _ := m.db.OpenEntries(ctx); len(open) != 0 {
				t.Errorf("%d journal entries still open", len(open))
			}
			ents, err := os.ReadDir(m.layout.JailsDir())
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range ents {
				if strings.HasPrefix(e.Name(), ".tmp-") {
					t.Errorf("half-made dir left: %s", e.Name())
				}
			}
			wantDirs := 1
			if tc.kept {
				wantDirs += crashBatch
			}
			if len(ents) != wantDirs {
				t.Errorf("%d entries in %s, want %d (the source and every fork of the batch, or none)", len(ents), m.layout.JailsDir(), wantDirs)
			}
			var forks []api.Instance
			for i := range crashBatch {
				name := fmt.Sprintf("crashfork-%d", i+1)
				f, err := m.GetInstance(ctx, name)
				if !tc.kept {
					if !errors.Is(err, api.ErrNotFound) {
						t.Errorf("fork %s of a batch killed before every dir of it was in place: %+v, %v; want none", name, f, err)
					}
					continue
				}
				if err != nil {
					t.Errorf("fork %s of a batch whose dirs were all in place: %v", name, err)
					continue
				}
				if f.State != api.StateStandby || f.ForkMode != string(memfile.ModeHardlink) {
					t.Errorf("fork %s: %s, fork_mode %q (error %q), want Standby, hardlink", name, f.State, f.ForkMode, f.Error)
				}
				if got := fingerprint(t, latestMem(t, m, f.ID)); got.ino != srcMem.ino || got.sum != srcMem.sum {
					t.Errorf("fork %s does not link its source's mem-file", name)
				}
				forks = append(forks, f)
			}
			in, err := m.GetInstance(ctx, "src")
			if err != nil || in.State != api.StateStandby {
				t.Fatalf("src after the crash: %+v, %v; want Standby", in, err)
			}
			if got := fingerprint(t, latestMem(t, m, src.ID)); got.sum != srcMem.sum {
				t.Error("the crash changed the source's mem-file")
			}
			for _, f := range forks {
				action(t, m, f.ID, "restore")
				verifyGuest(t, m, f.ID)
			}
			action(t, m, "src", "restore")
			verifyGuest(t, m, src.ID)
		})
	}
}
