package instance

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/forkd/forkd/internal/api"
)

func TestStandbyRestoreCycleKeepsGuestMemory(t *testing.T) {
	m := newTestManager(t)
	ctx := context.Background()
	src := createRunning(t, m, "src")
	verifyGuest(t, m, src.ID)
	for i := 0; i < 2; i++ {
		in := action(t, m, "src", "standby")
		if in.State != api.StateStandby || in.SnapshotCacheKey == "" || in.Pid != 0 {
			t.Fatalf("after standby %d: %+v", i, in)
		}
		if _, err := os.Stat(latestMem(t, m, src.ID)); err != nil {
			t.Fatalf("standby %d: no snapshot-latest: %v", i, err)
		}
		in = action(t, m, src.ID[:6], "restore")
		if in.State != api.StateRunning {
			t.Fatalf("after restore %d: %s", i, in.State)
		}
		if _, err := os.Stat(latestMem(t, m, src.ID)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("restore %d: snapshot-latest still present (%v)", i, err)
		}
		if _, err := os.Stat(baseMem(t, m, src.ID)); err != nil {
			t.Fatalf("restore %d: no retained snapshot-base: %v", i, err)
		}
		verifyGuest(t, m, src.ID)
	}
	action(t, m, "src", "pause")
	if _, err := m.Action(ctx, "src", "pause", api.ActionRequest{}); !errors.Is(err, api.ErrInvalidState) {
		t.Fatalf("pause of a Paused instance: err = %v, want ErrInvalidState", err)
	}
	action(t, m, "src", "resume")
	in := action(t, m, "src", "stop")
	if in.State != api.StateStopped {
		t.Fatalf("stop: %s", in.State)
	}
	in = action(t, m, "src", "start")
	verifyGuest(t, m, in.ID)
}

func TestRestoreFailureLeavesStandbyAndIsRetryable(t *testing.T) {
	m := newTestManager(t)
	ctx := context.Background()
	src := createRunning(t, m, "src")
	action(t, m, "src", "standby")
	g, _ := m.layout.Guest(src.ID)
	vmstate := g.Latest().VMState()
	good, err := os.ReadFile(vmstate)
	if err != nil {
		t.Fatal(err)
	}
	bad := append([]byte(nil), good...)
	bad[len(bad)/2] ^= 0xff // the VMM refuses a vmstate whose CRC does not match
	if err := os.WriteFile(vmstate, bad, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Action(ctx, "src", "restore", api.ActionRequest{}); err == nil {
		t.Fatal("restore of a corrupt vmstate succeeded")
	}
	in, _ := m.GetInstance(ctx, "src")
	if in.State != api.StateStandby || in.Error == "" || in.Pid != 0 {
		t.Fatalf("after failed restore: state %s error %q pid %d; want Standby with an error", in.State, in.Error, in.Pid)
	}
	if _, err := os.Stat(g.Latest().Memory()); err != nil {
		t.Fatalf("failed restore deleted the mem-file: %v", err)
	}
	if _, err := os.Stat(g.VMMSock()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("failed restore left the VMM socket: %v", err)
	}
	if err := os.WriteFile(vmstate, good, 0o644); err != nil {
		t.Fatal(err)
	}
	in = action(t, m, "src", "restore")
	if in.State != api.StateRunning || in.Error != "" {
		t.Fatalf("retry: %+v", in)
	}
	verifyGuest(t, m, src.ID)
}

func TestRefResolution(t *testing.T) {
	m := newTestManager(t)
	ctx := context.Background()
	f := false
	a, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "alpha", MemoryMiB: testMemMiB, Start: &f})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "alpha", Start: &f}); !errors.Is(err, api.ErrExists) {
		t.Fatalf("duplicate name: %v, want ErrExists", err)
	}
	b, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: a.ID[:4], MemoryMiB: testMemMiB, Start: &f})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ref  string
		want string
		err  error
	}{
		{a.ID, a.ID, nil},
		{"alpha", a.ID, nil},
		{a.ID[:4], b.ID, nil}, // a name beats an id prefix
		{a.ID[:8], a.ID, nil},
		{"zzzz", "", api.ErrNotFound},
		{"", "", api.ErrInvalid},
	} {
		got, err := m.GetInstance(ctx, tc.ref)
		if tc.err != nil {
			if !errors.Is(err, tc.err) {
				t.Errorf("GetInstance(%q): err %v, want %v", tc.ref, err, tc.err)
			}
			continue
		}
		if err != nil || got.ID != tc.want {
			t.Errorf("GetInstance(%q) = %s, %v; want %s", tc.ref, got.ID, err, tc.want)
		}
	}
	items := []string{"abc1", "abc2"}
	id := func(s string) string { return s }
	if _, err := resolve("abc", "x", items, id, id); !errors.Is(err, api.ErrAmbiguous) {
		t.Errorf("ambiguous prefix: %v, want ErrAmbiguous", err)
	}
}

func TestVMMDeathIsNoticedAndStops(t *testing.T) {
	m := newTestManager(t)
	ctx := context.Background()
	in := createRunning(t, m, "vm")
	if err := syscall.Kill(in.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitDead(t, in.Pid)
	if got, _ := m.GetInstance(ctx, "vm"); got.State != api.StateStopped || got.Error == "" {
		t.Fatalf("GET after the VMM died: state %s error %q; want Stopped with the reason", got.State, got.Error)
	}
	if _, err := m.Action(ctx, "vm", "standby", api.ActionRequest{}); !errors.Is(err, api.ErrInvalidState) {
		t.Fatalf("standby of an instance whose VMM died: %v, want ErrInvalidState", err)
	}
	got, _ := m.GetInstance(ctx, "vm")
	if got.State != api.StateStopped || got.Error == "" {
		t.Fatalf("after VMM death: state %s error %q; want Stopped with the reason", got.State, got.Error)
	}
	action(t, m, "vm", "start")
	verifyGuest(t, m, in.ID)
}

func TestCreateRefusesHostPathsInsideTheDataDir(t *testing.T) {
	m := newTestManager(t)
	ctx := context.Background()
	src := createRunning(t, m, "src")
	action(t, m, "src", "standby")
	g, _ := m.layout.Guest(src.ID)
	link := filepath.Join(t.TempDir(), "sneaky")
	if err := os.Symlink(g.Latest().Memory(), link); err != nil {
		t.Fatal(err)
	}
	f := false
	for _, p := range []string{g.Latest().Memory(), m.layout.DB(), link,
		filepath.Join(m.layout.GuestsDir(), src.ID, "..", src.ID, "rootfs.ext4")} {
		if _, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "thief", Rootfs: p, Start: &f}); !errors.Is(err, api.ErrInvalid) {
			t.Errorf("create with rootfs %s: %v, want ErrInvalid", p, err)
		}
	}
	outside := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(outside, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	in, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "ok", MemoryMiB: testMemMiB, Rootfs: outside, BootArgs: testBootArgs})
	if err != nil {
		t.Fatalf("create with a rootfs outside the data dir: %v", err)
	}
	verifyGuest(t, m, in.ID)
}
