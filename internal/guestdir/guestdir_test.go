package guestdir

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestLayoutPathsFollowDesignLayout(t *testing.T) {
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
		{g.VMMSock(), "/data/guests/abc123/vmm.sock"},
		{g.VMMLog(), "/data/guests/abc123/logs/vmm.log"},
		{g.Kernel(), "/data/guests/abc123/kernel"},
		{g.Rootfs(), "/data/guests/abc123/rootfs.ext4"},
		{g.Latest().VMState(), "/data/guests/abc123/snapshots/snapshot-latest/vmstate"},
		{g.Latest().Memory(), "/data/guests/abc123/snapshots/snapshot-latest/memory"},
		{g.Base().Memory(), "/data/guests/abc123/snapshots/snapshot-base/memory"},
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

func TestGuestRefusesSocketPathOverKernelLimit(t *testing.T) {
	long, _ := New("/" + strings.Repeat("d", 80))
	if _, err := long.Guest(strings.Repeat("a", 24)); err == nil || !strings.Contains(err.Error(), "socket path") {
		t.Fatalf("Guest under a long data dir: err = %v, want a socket path error", err)
	}
	short, _ := New("/d")
	if _, err := short.Guest(strings.Repeat("a", 24)); err != nil {
		t.Fatalf("Guest under a short data dir: %v", err)
	}
}

func TestTempDirsAreRecognisable(t *testing.T) {
	l, _ := New("/data")
	g, err := l.TempGuest("abc")
	if err != nil {
		t.Fatal(err)
	}
	s, _ := l.TempSnapshot("abc")
	for _, d := range []string{g.Dir, s.Dir} {
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

func TestLostFoundEntriesStayInLostFound(t *testing.T) {
	l, _ := New("/data")
	p, err := l.LostFoundEntry(l.GuestsDir(), "abc", 0)
	if err != nil || p != "/data/lost+found/guests/abc" {
		t.Errorf("LostFoundEntry(guests, abc, 0) = %q, %v", p, err)
	}
	p, err = l.LostFoundEntry(l.SnapshotsDir(), "abc", 2)
	if err != nil || p != "/data/lost+found/snapshots/abc.2" {
		t.Errorf("LostFoundEntry(snapshots, abc, 2) = %q, %v", p, err)
	}
	for _, name := range []string{"", ".", "..", "a/b", "../x"} {
		if p, err := l.LostFoundEntry(l.GuestsDir(), name, 0); err == nil {
			t.Errorf("LostFoundEntry(%q) = %q, want an error", name, p)
		}
	}
	if p, err := l.LostFoundEntry("/etc", "x", 0); err == nil {
		t.Errorf("LostFoundEntry from /etc = %q, want an error", p)
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
	g := Guest{Dir: "/data/guests/a"}
	for in, want := range map[string]string{
		g.Latest().VMState():       "snapshots/snapshot-latest/vmstate",
		g.Base().Memory():          "snapshots/snapshot-base/memory",
		g.Kernel():                 "kernel",
		"/data/guests/ab/kernel":   "/data/guests/ab/kernel",
		"/boot/vmlinux":            "/boot/vmlinux",
		"/data/guests/a/../b/disk": "/data/guests/a/../b/disk",
	} {
		if got := g.InVMM(in); got != want {
			t.Errorf("InVMM(%s) = %s, want %s", in, got, want)
		}
	}
}
