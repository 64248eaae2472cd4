package guestdir

import (
	"path/filepath"
	"strings"
	"testing"
)

// The paths match the on-disk layout of docs/architecture.md §4.
func TestLayoutPathsFollowTheLayout(t *testing.T) {
	l, err := New("/data")
	if err != nil {
		t.Fatal(err)
	}
	g, err := l.Guest("abc123")
	if err != nil {
		t.Fatal(err)
	}
	s, err := l.Snapshot("snap1")
	if err != nil {
		t.Fatal(err)
	}
	p, err := l.PagerDir("0.1.0-dev")
	if err != nil {
		t.Fatal(err)
	}
	ws, err := l.WorkingSet("0123456789abcdef01234567")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ got, want string }{
		{l.DB(), "/data/forkd.db"},
		{l.Socket(), "/data/forkd.sock"},
		{g.Jail, "/data/jail/forkd-vmm/abc123"},
		{g.Dir, "/data/jail/forkd-vmm/abc123/root"},
		{g.VMMSock(), "/data/jail/forkd-vmm/abc123/root/vmm.sock"},
		{g.VMMLog(), "/data/jail/forkd-vmm/abc123/vmm.log"},
		{g.Kernel(), "/data/jail/forkd-vmm/abc123/root/kernel"},
		{g.Rootfs(), "/data/jail/forkd-vmm/abc123/root/rootfs.ext4"},
		{g.Latest().VMState(), "/data/jail/forkd-vmm/abc123/root/snapshots/snapshot-latest/vmstate"},
		{g.Latest().Memory(), "/data/jail/forkd-vmm/abc123/root/snapshots/snapshot-latest/memory"},
		{g.Base().Memory(), "/data/jail/forkd-vmm/abc123/root/snapshots/snapshot-base/memory"},
		{g.DevDir(), "/data/jail/forkd-vmm/abc123/root/dev"},
		{g.ExecLink(), "/data/jail/forkd-vmm/abc123/root/forkd-vmm"},
		{g.PidFile(), "/data/jail/forkd-vmm/abc123/root/forkd-vmm.pid"},
		{l.JailBase(), "/data/jail"},
		{l.StagedExec(), "/data/exec/forkd-vmm"},
		{l.LegacyGuestsDir(), "/data/guests"},
		{s.Memory(), "/data/snapshots/snap1/memory"},
		{s.MemoryZst(), "/data/snapshots/snap1/memory.zst"},
		{s.Meta(), "/data/snapshots/snap1/meta.json"},
		{p, "/data/pager/0.1.0-dev"},
		{ws, "/data/prefetch/0123456789abcdef01234567.ws"},
	} {
		if tc.got != tc.want {
			t.Errorf("path = %q, want %q", tc.got, tc.want)
		}
	}
}

func TestIDsCannotEscapeDataDir(t *testing.T) {
	l, _ := New("/data")
	for _, id := range []string{"", "..", ".", "../x", "a/b", ".tmp-x", "-x", "a b", strings.Repeat("a", 65)} {
		if g, err := l.Guest(id); err == nil {
			t.Errorf("Guest(%q) = %s, want an error", id, g.Dir)
		}
		if s, err := l.Snapshot(id); err == nil {
			t.Errorf("Snapshot(%q) = %s, want an error", id, s.Dir)
		}
		if w, err := l.WorkingSet(id); err == nil {
			t.Errorf("WorkingSet(%q) = %s, want an error", id, w)
		}
	}
	for _, v := range []string{"..", "../1", "a/b", ""} {
		if p, err := l.PagerDir(v); err == nil {
			t.Errorf("PagerDir(%q) = %s, want an error", v, p)
		}
	}
}

// The jail root is <chroot_base>/<exec_name>/<id>/root, a jailer's layout:
// the exec name the layout is given names the level above every guest, and
// the guest dir is a jailer's jail root for the same id.
func TestGuestDirIsTheJailersJailRoot(t *testing.T) {
	l, _ := New("/data")
	fc, err := l.WithExec(ExecFirecracker)
	if err != nil {
		t.Fatal(err)
	}
	g, _ := fc.Guest("abc")
	if want := "/data/jail/firecracker/abc/root"; g.Dir != want || filepath.Join(fc.JailBase(), fc.Exec(), "abc", "root") != want {
		t.Errorf("guest dir with exec firecracker = %s, want %s", g.Dir, want)
	}
	if fc.StagedExec() != "/data/exec/firecracker" || filepath.Base(fc.StagedExec()) != fc.Exec() {
		t.Errorf("staged exec = %s: its base name must be the exec name", fc.StagedExec())
	}
	for _, bad := range []string{"", "..", "a/b", ".x"} {
		if _, err := l.WithExec(bad); err == nil {
			t.Errorf("WithExec(%q) accepted", bad)
		}
	}
	dir, log, err := l.LegacyGuest("abc")
	if err != nil || dir != "/data/guests/abc" || log != "/data/guests/abc/logs/vmm.log" {
		t.Errorf("LegacyGuest = %s, %s, %v", dir, log, err)
	}
}

func TestTempDirsAreRecognisable(t *testing.T) {
	l, _ := New("/data")
	g, err := l.TempGuest("abc")
	if err != nil {
		t.Fatal(err)
	}
	s, _ := l.TempSnapshot("abc")
	del, _ := l.DeletingGuest("abc")
	if g.Dir != filepath.Join(g.Jail, "root") || filepath.Dir(g.Jail) != l.JailsDir() {
		t.Errorf("TempGuest = %+v: want a temp jail dir beside the guests, with root/ inside", g)
	}
	for _, d := range []string{g.Jail, s.Dir, del} {
		if !IsTemp(filepath.Base(d)) {
			t.Errorf("IsTemp(%s) = false", d)
		}
	}
	if IsTemp("abc") {
		t.Error("IsTemp(abc) = true")
	}
}

func TestTempIDAcceptsOnlyForkdsOwnTempNames(t *testing.T) {
	id := "0123456789abcdef01234567"
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{".tmp-" + id, true},
		{".tmp-" + id + ".deleting", true},
		{id, false},
		{".tmp-", false},
		{".tmp-notes", false},
		{".tmp-" + id + ".old", false},
		{".tmp-" + strings.ToUpper(id), false},
		{".tmp-" + id[:23], false},
		{".tmp-../" + id, false},
	} {
		got, ok := TempID(tc.name)
		if ok != tc.ok || (ok && got != id) {
			t.Errorf("TempID(%q) = %q, %v; want ok=%v", tc.name, got, ok, tc.ok)
		}
	}
	if !IsForkdID(id) || IsForkdID("web") || IsForkdID(id+"0") {
		t.Error("IsForkdID accepts only 24 lowercase hex digits")
	}
}

func TestPooledTreesHaveTheirOwnNames(t *testing.T) {
	l, _ := New("/data")
	id := "0123456789abcdef01234567"
	g, err := l.PooledGuest(id)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(g.Jail) != l.JailsDir() || g.Dir != filepath.Join(g.Jail, "root") {
		t.Errorf("PooledGuest = %+v: want a jail dir beside the guests, with root/ inside", g)
	}
	if got, ok := PooledID(filepath.Base(g.Jail)); !ok || got != id {
		t.Errorf("PooledID(%s) = %q, %v", filepath.Base(g.Jail), got, ok)
	}
	// Not a temp name: the start guard counts temp dirs as a VM's, and a
	// pooled tree is no VM's.
	if _, ok := TempID(filepath.Base(g.Jail)); ok || IsTemp(filepath.Base(g.Jail)) {
		t.Errorf("%s reads as a temp name", g.Jail)
	}
	for _, name := range []string{id, ".pool-", ".pool-notes", ".pool-" + id + ".deleting", ".pool-../" + id, ".tmp-" + id} {
		if _, ok := PooledID(name); ok {
			t.Errorf("PooledID(%q) accepted", name)
		}
	}
	if _, err := l.PooledGuest("../x"); err == nil {
		t.Error("PooledGuest(../x) accepted")
	}
}

func TestLostFoundEntriesStayInLostFound(t *testing.T) {
	l, _ := New("/data")
	p, err := l.LostFoundEntry(l.JailsDir(), "abc", 0)
	if err != nil || p != "/data/lost+found/jail/abc" {
		t.Errorf("LostFoundEntry(jail/forkd-vmm, abc, 0) = %q, %v", p, err)
	}
	p, err = l.LostFoundEntry(l.LegacyGuestsDir(), "abc", 1)
	if err != nil || p != "/data/lost+found/guests/abc.1" {
		t.Errorf("LostFoundEntry(guests, abc, 1) = %q, %v", p, err)
	}
	p, err = l.LostFoundEntry(l.SnapshotsDir(), "abc", 2)
	if err != nil || p != "/data/lost+found/snapshots/abc.2" {
		t.Errorf("LostFoundEntry(snapshots, abc, 2) = %q, %v", p, err)
	}
	for _, name := range []string{"", ".", "..", "a/b", "../x"} {
		if p, err := l.LostFoundEntry(l.JailsDir(), name, 0); err == nil {
			t.Errorf("LostFoundEntry(%q) = %q, want an error", name, p)
		}
	}
	for _, dir := range []string{"/etc", l.JailBase(), "/data/jail/..", "/data"} {
		if p, err := l.LostFoundEntry(dir, "x", 0); err == nil {
			t.Errorf("LostFoundEntry from %s = %q, want an error", dir, p)
		}
	}
}

func TestWorkingSetKeyReadsOnlyRecordingNames(t *testing.T) {
	for name, want := range map[string]string{
		"0123456789abcdef01234567.ws":     "0123456789abcdef01234567",
		"0123456789abcdef01234567.ws.tmp": "",
		"0123456789abcdef01234567":        "",
		".ws":                             "",
		"..ws":                            "",
	} {
		got, ok := WorkingSetKey(name)
		if got != want || ok != (want != "") {
			t.Errorf("WorkingSetKey(%q) = %q, %v; want %q", name, got, ok, want)
		}
	}
}

func TestInVMMIsRelativeToTheGuestDir(t *testing.T) {
	g := Guest{Dir: "/data/jail/x/a/root"}
	for in, want := range map[string]string{
		g.Latest().VMState():            "snapshots/snapshot-latest/vmstate",
		g.Base().Memory():               "snapshots/snapshot-base/memory",
		g.Kernel():                      "kernel",
		"/data/jail/x/a/rootb/kernel":   "/data/jail/x/a/rootb/kernel",
		"/boot/vmlinux":                 "/boot/vmlinux",
		"/data/jail/x/a/root/../b/disk": "/data/jail/x/a/root/../b/disk",
	} {
		if got := g.InVMM(in); got != want {
			t.Errorf("InVMM(%s) = %s, want %s", in, got, want)
		}
	}
}
