package firecracker

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// dialUnix connects to the VMM's API socket at path without following a
// symlink in its last component, whatever the path's length.
//
// A jailed VMM owns the directory its socket lies in: it could replace the
// socket with a symlink to another VMM's socket, or to any socket of the
// host, and the daemon would then drive that one. So the socket file is
// opened O_PATH|O_NOFOLLOW, checked to be a socket, and connected to
// through /proc/self/fd/N, which names that very inode (connect(2) itself
// has no O_NOFOLLOW). The directories above it are root's. The same trick
// lifts the kernel's 108-byte limit on a socket path: the magic link is
// short however deep the data dir is.
func dialUnix(ctx context.Context, path string) (net.Conn, error) {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: "unix", Addr: &net.UnixAddr{Name: path, Net: "unix"},
			Err: &os.PathError{Op: "open", Path: path, Err: err}}
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("dial %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, &net.OpError{Op: "dial", Net: "unix", Addr: &net.UnixAddr{Name: path, Net: "unix"},
			Err: fmt.Errorf("not a socket (mode %#o): never followed", st.Mode)}
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", "/proc/self/fd/"+strconv.Itoa(fd))
	if err != nil {
		// Say which socket, not which descriptor.
		if oe, ok := err.(*net.OpError); ok {
			oe.Addr = &net.UnixAddr{Name: path, Net: "unix"}
			return nil, oe
		}
		return nil, err
	}
	return conn, nil
}
