package firecracker

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestLaunchReturnsOnceAPISocketAnswers(t *testing.T) {
	spec := helperSpec(t, "serve")
	p := launchForTest(t, context.Background(), spec)
	info, err := NewClient(p.APISock).Describe(context.Background())
	if err != nil {
		t.Fatalf("Describe after Launch: %v", err)
	}
	if info.ID != spec.ID {
		t.Errorf("--id: VMM reports id %q, want %q", info.ID, spec.ID)
	}
	if !p.Alive() {
		t.Errorf("Alive() = false right after Launch")
	}
}

func TestLaunchedVMMOutlivesCancelledContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	p := launchForTest(t, ctx, helperSpec(t, "serve"))
	cancel()
	time.Sleep(200 * time.Millisecond) // give a (wrong) ctx-bound kill time to happen
	if !p.Alive() {
		t.Fatalf("VMM pid %d died when the launch ctx was cancelled; it must outlive it", p.Pid)
	}
	if _, err := NewClient(p.APISock).Describe(context.Background()); err != nil {
		t.Errorf("Describe after ctx cancel: %v", err)
	}
}

func TestLaunchedVMMRunsInItsOwnSession(t *testing.T) {
	p := launchForTest(t, context.Background(), helperSpec(t, "serve"))
	sid, err := unix.Getsid(p.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if sid != p.Pid {
		t.Errorf("getsid(%d) = %d, want the VMM to lead its own session", p.Pid, sid)
	}
	pgid, err := unix.Getpgid(p.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if mine := unix.Getpgrp(); pgid == mine {
		t.Errorf("VMM is in the test's process group %d; a signal to our group would kill it", mine)
	}
}

func TestLaunchedVMMOutlivesTheLauncherAndCanBeAdopted(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(shortTempDir(t), "api.sock")
	cmd := exec.Command(exe, sock)
	cmd.Env = append(os.Environ(), helperEnv+"=launcher")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("launcher (a stand-in daemon): %v; stderr: %s", err, exitStderr(err))
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("launcher printed %q, want a pid", out)
	}
	// The launcher has exited; its VMM must still run, now someone else's child.
	p, err := Adopt(pid, sock)
	if err != nil {
		t.Fatalf("Adopt VMM %d after its launcher exited: %v", pid, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Kill(ctx); err != nil {
		t.Fatalf("Kill adopted orphan: %v", err)
	}
	if p.Alive() {
		t.Error("orphan VMM Alive after Kill")
	}
}

func exitStderr(err error) []byte {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.Stderr
	}
	return nil
}

func TestLaunchedVMMGetsOnlyPATHAndSpecEnv(t *testing.T) {
	t.Setenv("FORKD_TEST_SECRET", "must-not-leak")
	spec := helperSpec(t, "serve")
	spec.Env = append(spec.Env, "EXTRA=1")
	p := launchForTest(t, context.Background(), spec)
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(p.Pid) + "/environ")
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
	want := []string{"PATH=" + os.Getenv("PATH"), helperEnv + "=serve", "EXTRA=1"}
	if !slices.Equal(got, want) {
		t.Errorf("VMM environment = %q, want exactly %q", got, want)
	}
}

func TestLaunchWritesOutputToLogAppending(t *testing.T) {
	spec := helperSpec(t, "serve")
	if err := os.MkdirAll(filepath.Dir(spec.LogPath), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(spec.LogPath, []byte("earlier run\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	launchForTest(t, context.Background(), spec)
	b, err := os.ReadFile(spec.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(b), "earlier run\n") || !strings.Contains(string(b), "serving on") {
		t.Errorf("log = %q, want the earlier content followed by the VMM's output", b)
	}
}

func TestLaunchFailsWithLogTailWhenSocketNeverAppears(t *testing.T) {
	spec := helperSpec(t, "silent")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err := Launch(ctx, spec)
	if err == nil {
		t.Fatal("Launch of a VMM that never listens succeeded")
	}
	if !strings.Contains(err.Error(), "did not answer") || !strings.Contains(err.Error(), "not listening") {
		t.Fatalf("error = %v; want a timeout quoting the log tail", err)
	}
	// The half-started VMM must not be left behind.
	m := regexp.MustCompile(`helper pid (\d+)`).FindStringSubmatch(err.Error())
	if m == nil {
		t.Fatalf("no pid in the log tail: %v", err)
	}
	pid, _ := strconv.Atoi(m[1])
	if _, err := os.Stat("/proc/" + m[1]); err == nil {
		t.Errorf("VMM pid %d still exists after a failed Launch", pid)
	}
}

func TestLaunchFailsFastWithLogTailWhenVMMExits(t *testing.T) {
	spec := helperSpec(t, "exit")
	// An earlier run's output must not be quoted as this launch's.
	if err := os.MkdirAll(filepath.Dir(spec.LogPath), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(spec.LogPath, []byte("EARLIER RUN CRASHED\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := Launch(ctx, spec)
	if err == nil {
		t.Fatal("Launch of a VMM that exits at once succeeded")
	}
	// "exited", not a timeout: Launch noticed the exit instead of waiting out ctx.
	if !strings.Contains(err.Error(), "exited") || !strings.Contains(err.Error(), "boom") {
		t.Errorf("error = %v; want an exit error quoting the log tail", err)
	}
	if ctx.Err() != nil {
		t.Errorf("Launch waited out its ctx instead of seeing the exit")
	}
	if strings.Contains(err.Error(), "EARLIER RUN") {
		t.Errorf("error quotes an earlier run's log: %v", err)
	}
}

func TestLaunchRefusesSocketOfLiveVMM(t *testing.T) {
	first := launchForTest(t, context.Background(), helperSpec(t, "serve"))
	spec := helperSpec(t, "serve")
	spec.APISock = first.APISock
	if p, err := Launch(context.Background(), spec); err == nil {
		p.Kill(context.Background())
		t.Fatal("Launch on the socket of a live VMM succeeded; it must refuse")
	} else if !strings.Contains(err.Error(), "already has a listener") {
		t.Errorf("error = %v; want it to say another VMM listens there", err)
	}
}

func TestLaunchNeverStealsTheSocketOfABusyVMM(t *testing.T) {
	spec := helperSpec(t, "serve")
	// A listener that accepts but never answers: a VMM busy in a long
	// snapshot load looks like this to a prober.
	ln, err := net.Listen("unix", spec.APISock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if p, err := Launch(context.Background(), spec); err == nil {
		p.Kill(context.Background())
		t.Fatal("Launch took over the socket of a live listener")
	}
	if _, err := os.Stat(spec.APISock); err != nil {
		t.Errorf("the live listener's socket was removed: %v", err)
	}
}

func TestLaunchRefusesACancelledContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if p, err := Launch(ctx, helperSpec(t, "serve")); err == nil {
		p.Kill(context.Background())
		t.Fatal("Launch with a cancelled ctx started a VMM")
	}
}

func TestLaunchReplacesStaleSocket(t *testing.T) {
	for _, tc := range []struct {
		name  string
		leave func(t *testing.T, path string)
	}{
		{"socket whose listener is gone (a crashed VMM)", func(t *testing.T, path string) {
			ln, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			ln.(*net.UnixListener).SetUnlinkOnClose(false)
			ln.Close()
		}},
		{"plain file", func(t *testing.T, path string) {
			if err := os.WriteFile(path, nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spec := helperSpec(t, "serve")
			tc.leave(t, spec.APISock)
			launchForTest(t, context.Background(), spec)
		})
	}
}

func TestKillReapsChildAndRemovesSocket(t *testing.T) {
	p, err := Launch(context.Background(), helperSpec(t, "serve"))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Kill(context.Background()); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	if p.Alive() {
		t.Error("Alive() after Kill")
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(p.Pid)); err == nil {
		t.Errorf("pid %d still in /proc after Kill (not reaped?)", p.Pid)
	}
	if _, err := os.Stat(p.APISock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("api socket after Kill: %v, want it removed", err)
	}
	if err := p.Kill(context.Background()); err != nil {
		t.Errorf("second Kill: %v, want nil", err)
	}
}

func TestAdoptReattachesAndKillsNonChild(t *testing.T) {
	launched := launchForTest(t, context.Background(), helperSpec(t, "serve"))
	p, err := Adopt(launched.Pid, launched.APISock)
	if err != nil {
		t.Fatalf("Adopt of a live VMM: %v", err)
	}
	if !p.Alive() {
		t.Fatal("adopted VMM not Alive")
	}
	// Kill through the adopted handle: the pidfd path, as after a daemon restart.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Kill(ctx); err != nil {
		t.Fatalf("Kill adopted: %v", err)
	}
	if p.Alive() {
		t.Error("adopted VMM Alive after Kill")
	}
	select {
	case <-launched.exited:
	case <-ctx.Done():
		t.Fatal("process did not exit after Kill of its adopted handle")
	}
	if _, err := os.Stat(p.APISock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("api socket after Kill: %v, want it removed", err)
	}
}

func TestAdoptRefuses(t *testing.T) {
	dead, err := Launch(context.Background(), helperSpec(t, "serve"))
	if err != nil {
		t.Fatal(err)
	}
	deadSock := dead.APISock
	if err := dead.Kill(context.Background()); err != nil {
		t.Fatal(err)
	}
	live := launchForTest(t, context.Background(), helperSpec(t, "serve"))
	for _, tc := range []struct {
		name string
		pid  int
		sock string
	}{
		{"dead pid", dead.Pid, deadSock},
		{"live pid, socket nobody answers", live.Pid, filepath.Join(shortTempDir(t), "none.sock")},
		{"invalid pid", 0, live.APISock},
		// A live pid and a live VMM socket that are not the same process:
		// what a recycled pid recorded for another VMM looks like.
		{"pid does not own the socket", os.Getpid(), live.APISock},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Adopt(tc.pid, tc.sock); err == nil {
				t.Errorf("Adopt(%d, %s) succeeded, want an error", tc.pid, tc.sock)
			}
		})
	}
}

func TestAdoptForKillFindsAVMMWhoseAPIDoesNotAnswer(t *testing.T) {
	spec := helperSpec(t, "silent")
	cmd := exec.Command(spec.Binary, "--api-sock", spec.APISock, "--id", "hung")
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, spec.Env...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan struct{})
	go func() { cmd.Wait(); close(waited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-waited })

	if _, err := Adopt(cmd.Process.Pid, spec.APISock); err == nil {
		t.Fatal("Adopt of a VMM whose socket does not answer succeeded")
	}
	for _, tc := range []struct {
		name string
		pid  int
		id   string
	}{
		{"other id", cmd.Process.Pid, "hung-not"},
		{"not a VMM (the test itself)", os.Getpid(), "hung"},
		{"invalid pid", -1, "hung"},
	} {
		if _, err := AdoptForKill(tc.pid, tc.id, spec.APISock); err == nil {
			t.Errorf("%s: AdoptForKill(%d, %s) succeeded, want a refusal", tc.name, tc.pid, tc.id)
		}
	}
	p, err := AdoptForKill(cmd.Process.Pid, "hung", spec.APISock)
	if err != nil {
		t.Fatalf("AdoptForKill of the hung VMM: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Kill(ctx); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	select {
	case <-waited:
	case <-ctx.Done():
		t.Fatal("hung VMM still running after Kill")
	}
}

// TestHasArgPairTakesBothFlagForms: the reconciler's scan finds a VMM by
// "--id X" or "--id=X"; AdoptForKill must then accept the same VMM, or the
// kill silently skips what the scan found.
func TestHasArgPairTakesBothFlagForms(t *testing.T) {
	for _, tc := range []struct {
		cmdline string
		want    bool
	}{
		{"/vmm\x00--id\x00abc\x00--api-sock\x00/vmm.sock\x00", true},
		{"/vmm\x00--api-sock\x00/vmm.sock\x00--id=abc\x00", true},
		{"/vmm\x00--id\x00abcd\x00", false},
		{"/vmm\x00--id=abcd\x00", false},
		{"/vmm\x00--id\x00", false},
		{"/vmm\x00abc\x00--id\x00", false},
		{"/vmm\x00--idx\x00abc\x00", false},
	} {
		if got := hasArgPair([]byte(tc.cmdline), "--id", "abc"); got != tc.want {
			t.Errorf("hasArgPair(%q, --id, abc) = %v, want %v", tc.cmdline, got, tc.want)
		}
	}
}

func TestAliveIsFalseForReusedPid(t *testing.T) {
	p := launchForTest(t, context.Background(), helperSpec(t, "serve"))
	// Same pid, other start time: what a recycled pid looks like.
	other := &Process{Pid: p.Pid, APISock: p.APISock, startTime: p.startTime + 1}
	if other.Alive() {
		t.Error("Alive() = true for a pid whose start time differs; a reused pid must not pass for the VMM")
	}
	same := &Process{Pid: p.Pid, APISock: p.APISock, startTime: p.startTime}
	if !same.Alive() {
		t.Error("Alive() = false for the right pid and start time")
	}
}

func TestParseStat(t *testing.T) {
	for _, tc := range []struct {
		name      string
		in        string
		wantState byte
		wantStart uint64
		wantErr   bool
	}{
		{"plain", "42 (firecracker) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 98765 1000 10", 'S', 98765, false},
		{"comm with spaces and parens", "7 (a) (b c) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 555 0 0", 'Z', 555, false},
		{"truncated", "7 (x) S 1 2", 0, 0, true},
		{"no comm", "garbage", 0, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, err := parseStat([]byte(tc.in))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tc.wantErr)
			}
			if !tc.wantErr && (st.state != tc.wantState || st.startTime != tc.wantStart) {
				t.Errorf("got state %c start %d, want %c %d", st.state, st.startTime, tc.wantState, tc.wantStart)
			}
		})
	}
}

func TestKillLeavesTheSocketOfANewerVMM(t *testing.T) {
	old := launchForTest(t, context.Background(), helperSpec(t, "serve"))
	// The old VMM's socket file is gone (unlinked) and a newer VMM listens
	// at the same path while the old process still runs.
	if err := os.Remove(old.APISock); err != nil {
		t.Fatal(err)
	}
	spec := helperSpec(t, "serve")
	spec.APISock = old.APISock
	newer := launchForTest(t, context.Background(), spec)
	if err := old.Kill(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := NewClient(newer.APISock).Describe(context.Background()); err != nil {
		t.Errorf("the newer VMM's socket broke when the old VMM was killed: %v", err)
	}
}

func TestLaunchRecordsTheVMMVersion(t *testing.T) {
	p := launchForTest(t, context.Background(), helperSpec(t, "serve"))
	want, _ := ParseVersion(helperVersion)
	if p.Version != want {
		t.Fatalf("Process.Version = %v, want %v (GET /version)", p.Version, want)
	}
	if v, err := p.Client().Version(context.Background()); err != nil || v != want {
		t.Fatalf("Process.Client().Version = %v, %v; want %v", v, err, want)
	}
	// An adopted VMM's version is read again, not assumed.
	ap, err := Adopt(p.Pid, p.APISock)
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	if ap.Version != want {
		t.Fatalf("adopted Process.Version = %v, want %v", ap.Version, want)
	}
}

// A VMM forkd cannot drive is refused at launch with a clear error and
// killed: nothing is left running on the socket.
func TestLaunchRefusesAnUnsupportedVMM(t *testing.T) {
	for _, tc := range []struct{ role, want string }{
		{"old", "1.9.1 is older than 1.10.0"},
		{"noversion", "does not answer GET /version"},
	} {
		t.Run(tc.role, func(t *testing.T) {
			spec := helperSpec(t, tc.role)
			p, err := Launch(context.Background(), spec)
			if err == nil {
				p.Kill(context.Background())
				t.Fatalf("Launch of a %s VMM succeeded", tc.role)
			}
			if !errors.Is(err, ErrUnsupportedVersion) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Launch error %q: want ErrUnsupportedVersion saying %q", err, tc.want)
			}
			if _, serr := os.Stat(spec.APISock); !errors.Is(serr, os.ErrNotExist) {
				t.Fatalf("the refused VMM's socket is still there (%v): it was not killed", serr)
			}
		})
	}
}
