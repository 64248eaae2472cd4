package pager

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/testenv"
)

// dialAs connects to a Unix socket with the effective uid and gid of an
// unprivileged process (on one thread, returned to root before it is
// released).
func dialAs(path string, uid int) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, ^uintptr(0), uintptr(uid), ^uintptr(0)); e != 0 {
			errc <- e
			return
		}
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), uintptr(uid), ^uintptr(0)); e != 0 {
			errc <- e
			return
		}
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err == nil {
			err = unix.Connect(fd, &unix.SockaddrUnix{Name: path})
			unix.Close(fd)
		}
		unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), 0, ^uintptr(0))
		unix.RawSyscall(unix.SYS_SETRESGID, ^uintptr(0), 0, ^uintptr(0))
		errc <- err
	}()
	return <-errc
}

func TestSessionSocketInAJailBelongsToItsVMM(t *testing.T) {
	testenv.NeedRoot(t)
	p := startPager(t, Config{CacheBytes: cacheBytes})
	root := filepath.Dir(p.dir)
	mem := memFile(t, p.dir, 16, -1, 0, 0)
	jail := filepath.Join(root, "jail", "vm", "root")
	if err := os.MkdirAll(jail, 0o711); err != nil {
		t.Fatal(err)
	}
	// Let other uids through to the socket itself, so only its owner decides.
	for d := jail; d != filepath.Dir(root); d = filepath.Dir(d) {
		os.Chmod(d, 0o711)
	}
	ctx := context.Background()
	s, err := p.client.CreateSession(ctx, SessionRequest{SessionID: "j", BackingPath: mem, CacheKey: "k",
		SocketDir: jail, SocketOwner: &SocketOwner{UID: 64600, GID: 64600}})
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(jail, "j.sock"); s.SocketPath != want {
		t.Errorf("socket_path = %s, want %s", s.SocketPath, want)
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(filepath.Join(jail, "j.sock"), &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFSOCK || st.Uid != 64600 || st.Gid != 64600 {
		t.Fatalf("session socket in the jail: %v, mode %o uid %d gid %d; want a socket owned by 64600", err, st.Mode, st.Uid, st.Gid)
	}
	// The twin: another uid may not connect; the owner may.
	if err := dialAs(filepath.Join(jail, "j.sock"), 64601); !errors.Is(err, unix.EACCES) {
		t.Errorf("uid 64601 connecting to 64600's session socket: %v, want EACCES", err)
	}
	if err := dialAs(filepath.Join(jail, "j.sock"), 64600); err != nil {
		t.Errorf("uid 64600 connecting to its session socket: %v", err)
	}
	if err := p.client.DeleteSession(ctx, "j"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(jail, "j.sock")); !os.IsNotExist(err) {
		t.Errorf("socket after the session ended: %v, want it removed", err)
	}
}

// A VMM owns its jail root, so it may swap names in it: the pager removes
// its socket through the directory it opened, never through a name the VMM
// replaced with a symlink.
func TestSessionSocketIsRemovedThroughTheDirectoryItWasMadeIn(t *testing.T) {
	testenv.NeedRoot(t)
	p := startPager(t, Config{CacheBytes: cacheBytes})
	root := filepath.Dir(p.dir)
	mem := memFile(t, p.dir, 16, -1, 0, 0)
	jail := filepath.Join(root, "jail", "vm", "root")
	os.MkdirAll(jail, 0o700)
	ctx := context.Background()
	if _, err := p.client.CreateSession(ctx, SessionRequest{SessionID: "j", BackingPath: mem, CacheKey: "k", SocketDir: jail}); err != nil {
		t.Fatal(err)
	}
	moved := jail + ".moved"
	if err := os.Rename(jail, moved); err != nil {
		t.Fatal(err)
	}
	victim := t.TempDir()
	bait := filepath.Join(victim, "j.sock")
	if err := os.WriteFile(bait, []byte("not the pager's"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, jail); err != nil {
		t.Fatal(err)
	}
	if err := p.client.DeleteSession(ctx, "j"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(bait); err != nil {
		t.Errorf("the pager removed %s through the swapped-in symlink: %v", bait, err)
	}
	if _, err := os.Lstat(filepath.Join(moved, "j.sock")); !os.IsNotExist(err) {
		t.Errorf("the session's own socket survived: %v", err)
	}
}

func TestSessionSocketDirRefusals(t *testing.T) {
	p := startPager(t, Config{CacheBytes: cacheBytes})
	root := filepath.Dir(p.dir)
	mem := memFile(t, p.dir, 16, -1, 0, 0)
	jail := filepath.Join(root, "jail", "vm", "root")
	os.MkdirAll(jail, 0o700)
	link := filepath.Join(root, "jail", "link")
	os.Symlink(jail, link)
	for name, req := range map[string]SessionRequest{
		"outside the data dir":      {SocketDir: "/etc"},
		"through a symlink":         {SocketDir: link},
		"not a directory":           {SocketDir: mem},
		"missing":                   {SocketDir: jail + "-nope"},
		"relative":                  {SocketDir: "jail/vm/root"},
		"an owner and no directory": {SocketOwner: &SocketOwner{UID: 1, GID: 1}},
	} {
		req.SessionID, req.BackingPath, req.CacheKey = "x", mem, "k"
		_, err := p.client.CreateSession(context.Background(), req)
		var ae *APIError
		if !errors.As(err, &ae) || ae.Status != 400 {
			t.Errorf("%s: %v, want 400", name, err)
		}
	}
	if ents, _ := os.ReadDir(jail); len(ents) != 0 {
		t.Errorf("a refused session left %v in the jail", ents)
	}
}
