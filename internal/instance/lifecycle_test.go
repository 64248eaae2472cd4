package instance

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/store"
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
	if in.State != api.StateStandby || in.Error != "" || in.Pid != 0 {
		t.Fatalf("after failed restore: state %s error %q pid %d; want Standby, no stored error (the caller got it)", in.State, in.Error, in.Pid)
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
	// A name that is a (short) id prefix of another instance.
	b, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: a.ID[:8], MemoryMiB: testMemMiB, Start: &f})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ref  string
		want string
		err  error
		says []string
	}{
		{a.ID, a.ID, nil, nil},
		{"alpha", a.ID, nil, nil},
		{b.ID[:6], b.ID, nil, nil},
		{b.ID[:5], "", api.ErrNotFound, []string{"at least 6"}},
		// One instance's name, the other's id prefix: never a pick.
		{a.ID[:8], "", api.ErrAmbiguous, []string{a.ID, b.ID}},
		{"zzzz", "", api.ErrNotFound, nil},
		{"", "", api.ErrInvalid, nil},
	} {
		got, err := m.GetInstance(ctx, tc.ref)
		if tc.err != nil {
			if !errors.Is(err, tc.err) {
				t.Errorf("GetInstance(%q): err %v, want %v", tc.ref, err, tc.err)
			}
			for _, w := range tc.says {
				if err != nil && !strings.Contains(err.Error(), w) {
					t.Errorf("GetInstance(%q): %v; want it to say %q", tc.ref, err, w)
				}
			}
			continue
		}
		if err != nil || got.ID != tc.want {
			t.Errorf("GetInstance(%q) = %s, %v; want %s", tc.ref, got.ID, err, tc.want)
		}
	}
	items := []string{"abcdef1", "abcdef2"}
	id := func(s string) string { return s }
	if _, err := resolve("abcdef", "x", "", items, id, func(string) string { return "" }); !errors.Is(err, api.ErrAmbiguous) {
		t.Errorf("ambiguous prefix: %v, want ErrAmbiguous", err)
	}
}

// Finding: a name equal to another instance's id shadowed it, and `forkd rm
// <that id>` removed the other, running, VM; one-character id prefixes
// resolved. Now such a name is refused, a store that holds one from before
// resolves the id as ambiguous (naming both), and a destructive command
// never takes a prefix.
func TestNamesCannotShadowIDsAndDestructiveCommandsNeverGuess(t *testing.T) {
	m := newTestManager(t)
	ctx := context.Background()
	f := false
	victim := createRunning(t, m, "victim")
	if _, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: victim.ID, Start: &f}); !errors.Is(err, api.ErrInvalid) {
		t.Errorf("create named like an id: %v, want ErrInvalid", err)
	}
	action(t, m, "victim", "pause")
	if _, err := m.ForkInstance(ctx, "victim", api.ForkRequest{Name: newID(), FromRunning: true}); !errors.Is(err, api.ErrInvalid) {
		t.Errorf("fork named like an id: %v, want ErrInvalid", err)
	}
	if _, err := m.CreateSnapshot(ctx, "victim", api.SnapshotRequest{Name: newID()}); !errors.Is(err, api.ErrInvalid) {
		t.Errorf("snapshot named like an id: %v, want ErrInvalid", err)
	}
	action(t, m, "victim", "resume")
	unnamed, err := m.CreateInstance(ctx, api.CreateInstanceRequest{MemoryMiB: testMemMiB, Start: &f})
	if err != nil || unnamed.Name != unnamed.ID {
		t.Errorf("an unnamed instance is named by its own id: %+v, %v", unnamed, err)
	}

	// A store from before the rule: another instance named with the victim's id.
	shadow := store.Instance{ID: newID(), Name: victim.ID, State: api.StateCreated, Vcpus: 1, MemoryMiB: testMemMiB, CreatedAt: time.Now()}
	if err := m.db.CreateInstance(ctx, shadow); err != nil {
		t.Fatal(err)
	}
	if err := m.DeleteInstance(ctx, victim.ID); !errors.Is(err, api.ErrAmbiguous) || !strings.Contains(err.Error(), shadow.ID) {
		t.Errorf("delete by a shadowed id: %v; want ErrAmbiguous naming both", err)
	}
	if _, err := m.Action(ctx, victim.ID, "stop", api.ActionRequest{}); !errors.Is(err, api.ErrAmbiguous) {
		t.Errorf("stop by a shadowed id: %v; want ErrAmbiguous", err)
	}
	m.db.DeleteInstance(ctx, shadow.ID)

	// A unique prefix reads, but never deletes or stops.
	prefix := victim.ID[:10]
	if got, err := m.GetInstance(ctx, prefix); err != nil || got.ID != victim.ID {
		t.Errorf("get by a unique prefix: %v, %v", got.ID, err)
	}
	if err := m.DeleteInstance(ctx, prefix); !errors.Is(err, api.ErrAmbiguous) {
		t.Errorf("delete by a prefix: %v; want ErrAmbiguous", err)
	}
	if _, err := m.Action(ctx, prefix, "stop", api.ActionRequest{}); !errors.Is(err, api.ErrAmbiguous) {
		t.Errorf("stop by a prefix: %v; want ErrAmbiguous", err)
	}
	if got, err := m.GetInstance(ctx, "victim"); err != nil || got.State != api.StateRunning {
		t.Fatalf("the victim after the refused commands: %+v, %v; want it Running", got, err)
	}
	// The exact name and the full id still work.
	action(t, m, victim.ID, "stop")
	if err := m.DeleteInstance(ctx, "victim"); err != nil {
		t.Errorf("delete by exact name: %v", err)
	}
}

func TestVMMDeathIsNoticedAndStops(t *testing.T) {
	m := newTestManager(t)
	ctx := context.Background()
	in := createRunning(t, m, "vm")
	if err := syscall.Kill(in.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// The exit is an event: the supervisor records it without anyone
	// asking, and the error says how the VMM ended.
	if got := waitState(t, m, "vm", api.StateStopped); !strings.Contains(got.Error, "killed by signal 9 (SIGKILL)") {
		t.Fatalf("after the VMM died: error %q; want the reason (killed by SIGKILL)", got.Error)
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
		filepath.Join(m.layout.JailsDir(), src.ID, "..", src.ID, "rootfs.ext4")} {
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
