package instance

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/emulator"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/testenv"
)

// TestLifecycleAtOldestAndNewestFirecracker runs the manager's whole
// lifecycle (boot, standby, File and Uffd restore, fork, stop) against the
// emulator standing for the oldest and the newest supported release, each
// as strict as that release: a request field the release lacks fails the
// operation that sends it. (The full instance suite runs at the newest,
// and `make test` runs a subset again at the oldest.)
func TestLifecycleAtOldestAndNewestFirecracker(t *testing.T) {
	if _, err := os.Stat("/dev/userfaultfd"); err != nil {
		testenv.Need(t, testenv.Uffd, "no /dev/userfaultfd: "+err.Error())
	}
	versions := emulator.SupportedVersions()
	for _, ver := range []string{versions[0], versions[len(versions)-1]} {
		t.Run(ver, func(t *testing.T) {
			m := newTestManager(t, func(c *Config) {
				c.VMM.Args = []string{"vmm", "--firecracker-version", ver}
			})
			ctx := context.Background()
			src := createRunning(t, m, "src")
			want, err := firecracker.ParseVersion(ver)
			if err != nil {
				t.Fatal(err)
			}
			if p := m.proc(src.ID); p == nil || p.Version.Major != want.Major || p.Version.Minor != want.Minor {
				t.Fatalf("the launched VMM's version is %v, want %s", p, ver)
			}
			verifyGuest(t, m, src.ID)
			action(t, m, "src", "standby")
			action(t, m, "src", "restore") // File
			verifyGuest(t, m, src.ID)
			action(t, m, "src", "standby") // a Diff into the restored base
			in, err := m.Action(ctx, "src", "restore", api.ActionRequest{RestoreBackend: api.BackendUffd})
			if err != nil || in.State != api.StateRunning {
				t.Fatalf("uffd restore at %s: %+v, %v", ver, in, err)
			}
			verifyGuest(t, m, src.ID)
			action(t, m, "src", "standby")
			f := fork(t, m, "src", api.ForkRequest{Name: "f", TargetState: api.StateRunning})
			verifyGuest(t, m, f.ID)
			live := fork(t, m, "f", api.ForkRequest{Name: "live", FromRunning: true, TargetState: api.StateRunning})
			verifyGuest(t, m, live.ID)
			verifyGuest(t, m, f.ID)
			action(t, m, "f", "stop")
			action(t, m, "f", "start")
			verifyGuest(t, m, f.ID)
		})
	}
}

// A VM on standby across a Firecracker downgrade: the older release
// refuses the newer snapshot format ("Invalid data version"), the restore
// says what to do, the VM stays on standby with its files, and once the
// release that wrote the snapshot is back it restores with its memory.
func TestRestoreAcrossAFirecrackerDowngradeKeepsTheVMOnStandby(t *testing.T) {
	versions := emulator.SupportedVersions()
	oldest, newest := versions[0], versions[len(versions)-1]
	dir := shortDir(t)
	open := func(ver string) *Manager {
		m, err := New(context.Background(), Config{
			DataDir:     dir,
			VMM:         VMMSpec{Binary: forkdBinary(t), Args: []string{"vmm", "--firecracker-version", ver}, Emulator: true},
			PagerBinary: forkdBinary(t),
			Logger:      slog.New(slog.NewTextHandler(testWriter{t}, nil)),
		})
		if err != nil {
			t.Fatalf("manager at Firecracker %s: %v", ver, err)
		}
		return m
	}
	t.Cleanup(func() { // a failure midway may leave the VM running
		m := open(newest)
		defer m.Close()
		list, _ := m.ListInstances(context.Background())
		for _, in := range list {
			if err := m.DeleteInstance(context.Background(), in.ID); err != nil {
				t.Errorf("cleanup: delete %s: %v", in.Name, err)
			}
		}
	})
	ctx := context.Background()

	m := open(newest)
	src := createRunning(t, m, "vm")
	verifyGuest(t, m, src.ID)
	action(t, m, "vm", "standby")
	m.Close()

	m = open(oldest)
	_, err := m.Action(ctx, "vm", "restore", api.ActionRequest{})
	if err == nil || !strings.Contains(err.Error(), "Invalid data version") || !strings.Contains(err.Error(), "restore it with the release that wrote it") {
		t.Fatalf("restore at %s of a snapshot written at %s: %v; want the VMM's refusal and what to do", oldest, newest, err)
	}
	if !errors.Is(err, api.ErrInvalidState) {
		t.Errorf("the refused restore is not invalid_state (409): %v", err)
	}
	if in, err := m.GetInstance(ctx, "vm"); err != nil || in.State != api.StateStandby {
		t.Fatalf("after the refused restore: %+v, %v; want Standby", in, err)
	}
	m.Close()

	m = open(newest)
	defer m.Close()
	if in := action(t, m, "vm", "restore"); in.State != api.StateRunning {
		t.Fatalf("restore back at %s: %s", newest, in.State)
	}
	verifyGuest(t, m, src.ID)
}

// Only a socket that is gone or dropping the request marks a VMM dead
// after a failed resume; a slow VMM (a timeout) or one that answered with
// a refusal is never taken for dead.
func TestSocketGoneTellsADeadVMMFromASlowOne(t *testing.T) {
	wrap := func(err error) error {
		return &url.Error{Op: "Patch", URL: "http://localhost/vm", Err: &net.OpError{Op: "read", Net: "unix", Err: err}}
	}
	for _, tc := range []struct {
		err  error
		gone bool
	}{
		{wrap(os.NewSyscallError("connect", syscall.ECONNREFUSED)), true},
		{wrap(os.NewSyscallError("connect", syscall.ENOENT)), true},
		{wrap(os.NewSyscallError("read", syscall.ECONNRESET)), true},
		{&url.Error{Op: "Put", URL: "http://localhost/vm", Err: io.EOF}, true},
		{wrap(context.DeadlineExceeded), false},
		{&firecracker.APIError{Method: "PATCH", Path: "/vm", Status: 400, FaultMessage: "no"}, false},
	} {
		if got := socketGone(tc.err); got != tc.gone {
			t.Errorf("socketGone(%v) = %v, want %v", tc.err, got, tc.gone)
		}
	}
}
