package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/api"
)

// lockDataDir takes an exclusive flock on <data>/forkd.lock for the life of
// the daemon: one daemon per data dir. A stale socket check alone would race
// (two daemons both find the old socket dead, both remove and re-create it),
// and the kernel drops the lock when the process dies, so a crash never
// leaves the data dir locked.
func lockDataDir(dataDir string) (*os.File, error) {
	path := filepath.Join(dataDir, "forkd.lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock data dir: %w", err)
	}
	if err := flockRetryingDeadOwner(f); err != nil {
		owner, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("another forkd daemon (pid %s) is already running with data dir %s; stop it first or pick another --data-dir",
				string(owner), dataDir)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	// The pid is informational (for the message above); the flock is the lock.
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())), 0)
	return f, nil
}

// flockRetryingDeadOwner takes the data dir's lock. A daemon killed a moment
// ago can leave its lock held for a few milliseconds by a child that was
// between fork and exec (the fd is close-on-exec, not close-on-fork), so
// while the recorded owner pid is dead it retries for up to two seconds; a
// live owner fails at once.
func flockRetryingDeadOwner(f *os.File) error {
	deadline := time.Now().Add(2 * time.Second)
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if !errors.Is(err, unix.EWOULDBLOCK) || time.Now().After(deadline) {
			return err
		}
		buf := make([]byte, 32)
		n, _ := f.ReadAt(buf, 0)
		pid, perr := strconv.Atoi(strings.TrimSpace(string(buf[:n])))
		if perr != nil || pid <= 0 || unix.Kill(pid, 0) != unix.ESRCH {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// listenUnix listens on the daemon socket with mode 0600. An existing file
// there is removed only if it is a socket nobody answers on.
func listenUnix(ctx context.Context, path string) (*net.UnixListener, error) {
	// sun_path holds 108 bytes including the NUL; a longer path fails in
	// bind with a bare EINVAL, so say what is wrong instead.
	if len(path) > 107 {
		return nil, fmt.Errorf("listen %s: the socket path is %d bytes, over the kernel's limit of 107; use a shorter --data-dir", path, len(path))
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listen %s: the path exists and is not a socket; move it away", path)
		}
		if answers(ctx, path) {
			return nil, fmt.Errorf("listen %s: another forkd daemon answers on this socket; stop it first", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	// The data dir is 0700, so nobody else can reach the socket in the
	// moment before this chmod narrows it from the umask's mode.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	return ln, nil
}

// answers reports whether a forkd daemon serves GET /health on sock.
func answers(ctx context.Context, sock string) bool {
	c, err := api.NewClient(sock)
	if err != nil {
		return false
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, err = c.Health(ctx)
	var ce *api.ConnectError
	// Anything that accepted the connection is alive, even if it is not
	// (or not yet) a healthy forkd: never delete a live socket.
	return !errors.As(err, &ce)
}
