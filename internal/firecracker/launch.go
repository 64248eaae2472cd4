package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/forkd/forkd/internal/network"
)

// LaunchSpec says how to start one VMM process.
type LaunchSpec struct {
	// Binary is the VMM executable: `firecracker`, or forkd's own binary.
	Binary string
	// Args go before the API flags, e.g. {"vmm"} for `forkd vmm`.
	Args []string
	// APISock is the API socket the VMM creates. A stale socket file nobody
	// answers on is removed first; a live one is refused.
	APISock string
	// ID is passed as --id (Firecracker's instance id).
	ID string
	// LogPath receives the VMM's stdout and stderr (appended; the parent
	// directory is created). Empty discards them.
	LogPath string
	// WorkDir is the VMM's working directory (relative paths in API calls
	// resolve against it). Empty inherits the caller's.
	WorkDir string
	// Env is added to the VMM's environment, which otherwise holds only PATH.
	Env []string
	// NetNS, when set, is the path of a network namespace (a named one
	// under /var/run/netns) the VMM starts in, as the jailer's --netns
	// does: it opens its TAP by name there. Only the launch enters it, on
	// a locked OS thread (network.Do); the caller's threads never do.
	NetNS string

	// Jailer, when set, starts the VMM through a jailer (Firecracker's, or
	// `forkd jailer`): Jailer[0] is the jailer and Jailer[1:] its own
	// arguments (jail.Args.CommandLine with no VMM arguments). Launch adds
	// "--", Args and --api-sock with APISock's path inside the jail; the
	// jailer passes --id itself. The jailer execs the VMM in place, so the
	// process started is the VMM. NetNS must then be empty: the jailer's
	// --netns joins the namespace.
	Jailer []string
	// JailRoot is the jail's root directory on this host (the jailer's
	// <chroot_base>/<exec_name>/<id>/root). With Jailer, APISock must lie
	// inside it.
	JailRoot string
}

// vmmCommand is the program and arguments Launch runs for spec.
func (spec LaunchSpec) vmmCommand() (string, []string, error) {
	if len(spec.Jailer) == 0 {
		// Inside its working directory the socket is named relative to
		// it: the kernel's 108-byte limit then bounds only the name, not
		// the data dir's depth (the daemon connects through dialUnix).
		sock := spec.APISock
		if rel, err := filepath.Rel(spec.WorkDir, sock); spec.WorkDir != "" && err == nil && filepath.IsAbs(sock) &&
			rel != ".." && !strings.HasPrefix(rel, "../") {
			sock = rel
		}
		args := append(append([]string{}, spec.Args...), "--api-sock", sock)
		if spec.ID != "" {
			args = append(args, "--id", spec.ID)
		}
		return spec.Binary, args, nil
	}
	if spec.NetNS != "" {
		return "", nil, fmt.Errorf("a jailed VMM joins its network namespace through the jailer's --netns, not LaunchSpec.NetNS")
	}
	rel, err := filepath.Rel(spec.JailRoot, spec.APISock)
	if spec.JailRoot == "" || err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, "../") {
		return "", nil, fmt.Errorf("api socket %s is not inside the jail root %q", spec.APISock, spec.JailRoot)
	}
	args := append(append([]string{}, spec.Jailer[1:]...), "--")
	args = append(append(args, spec.Args...), "--api-sock", "/"+rel)
	return spec.Jailer[0], args, nil
}

// defaultLaunchTimeout bounds the wait for the API socket when ctx has no
// deadline.
const defaultLaunchTimeout = 10 * time.Second

// logTailBytes is how much of the VMM's log a launch error quotes.
const logTailBytes = 4 << 10

// fallbackPATH is the VMM's PATH when the caller has none.
const fallbackPATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Launch starts a VMM and returns once its API socket answers GET /version
// with a release forkd drives (CheckSupported); the Process records it, so
// every later request is built for it. An unsupported VMM is killed and the
// error wraps ErrUnsupportedVersion.
//
// The VMM runs in its own session (setsid): it is not in the caller's process
// group, so a signal to the daemon's group or the daemon's exit does not take
// the VMs down with it. While the caller lives the VMM is its child, reaped by
// a goroutine so it never lingers as a zombie. ctx bounds only the wait for
// the socket (default 10 s): cancelling it later does not touch the process.
// If the VMM exits or the wait times out, the process is killed and the
// error quotes the tail of its log.
func Launch(ctx context.Context, spec LaunchSpec) (*Process, error) {
	if (spec.Binary == "" && len(spec.Jailer) == 0) || spec.APISock == "" {
		return nil, fmt.Errorf("launch vmm: binary and api socket are required (binary %q, socket %q)", spec.Binary, spec.APISock)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("launch vmm %s: %w", spec.APISock, err)
	}
	if err := clearStaleSocket(spec.APISock); err != nil {
		return nil, fmt.Errorf("launch vmm %s: %w", spec.APISock, err)
	}

	stdout, logStart, err := openLog(spec.LogPath)
	if err != nil {
		return nil, fmt.Errorf("launch vmm %s: %w", spec.APISock, err)
	}
	defer stdout.Close() // the child holds its own copy

	bin, args, err := spec.vmmCommand()
	if err != nil {
		return nil, fmt.Errorf("launch vmm: %w", err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = spec.WorkDir
	cmd.Env = vmmEnv(spec.Env)
	cmd.Stdin = nil // /dev/null
	cmd.Stdout = stdout
	cmd.Stderr = stdout
	// Own session: the VMM must outlive the daemon (restart, upgrade, crash).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	start := cmd.Start
	if spec.NetNS != "" {
		// The child inherits the namespace of the thread that forks it.
		start = func() error { return network.Do(spec.NetNS, cmd.Start) }
	}
	if err := start(); err != nil {
		return nil, fmt.Errorf("launch vmm %s: start %s: %w", spec.APISock, bin, err)
	}

	p := &Process{Pid: cmd.Process.Pid, APISock: spec.APISock, os: cmd.Process, exited: make(chan struct{})}
	p.startTime, _ = readStartTime(p.Pid)
	go func() {
		// Reap the child so it never lingers as a zombie while we live.
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()

	v, err := p.waitReady(ctx)
	if err == nil {
		err = CheckSupported(v)
	}
	if err != nil {
		killCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = p.Kill(killCtx)
		if errors.Is(err, ErrUnsupportedVersion) {
			return nil, fmt.Errorf("launch vmm %s (%s): %w", spec.APISock, spec.Binary, err)
		}
		return nil, fmt.Errorf("launch vmm %s (%s): %w%s", spec.APISock, spec.Binary, err, logTail(spec.LogPath, logStart))
	}
	p.Version = v
	return p, nil
}

// waitReady polls the API socket until GET /version answers, the process
// exits, or ctx (default 10 s) ends, and returns the version. The answer
// doubles as the readiness probe: it costs no extra round trip.
func (p *Process) waitReady(ctx context.Context) (Version, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultLaunchTimeout)
		defer cancel()
	}
	c := newClient(p.APISock, Timeouts{Call: 500 * time.Millisecond, Snapshot: defaultSnapshotTimeout})
	defer c.Close()
	// Every restore waits here, so poll finely: a stat until the socket
	// exists costs microseconds, and a VMM is usually up within ~10 ms.
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	var lastErr error
	for {
		select {
		case <-p.exited:
			return Version{}, fmt.Errorf("vmm exited before its API socket answered: %v", p.waitErr)
		default:
		}
		if _, err := os.Stat(p.APISock); err != nil {
			lastErr = err
		} else if s, err := c.GetVersion(ctx); err != nil {
			var apiErr *APIError
			if errors.As(err, &apiErr) {
				// It answers, but not GET /version: no Firecracker we know.
				return Version{}, fmt.Errorf("%w: the VMM does not answer GET /version: %w", ErrUnsupportedVersion, err)
			}
			if errors.Is(err, ErrUnsupportedVersion) {
				return Version{}, err
			}
			lastErr = err
		} else {
			v, err := ParseVersion(s)
			if err != nil {
				return Version{}, fmt.Errorf("%w: GET /version: %w", ErrUnsupportedVersion, err)
			}
			return v, nil
		}
		select {
		case <-p.exited:
			return Version{}, fmt.Errorf("vmm exited before its API socket answered: %v", p.waitErr)
		case <-ctx.Done():
			return Version{}, fmt.Errorf("vmm API socket did not answer: %w (last: %v)", ctx.Err(), lastErr)
		case <-tick.C:
		}
	}
}

// clearStaleSocket removes a socket file left by a dead VMM. A socket with a
// listener belongs to a live process (perhaps a busy VMM that does not
// answer in time) and must never be stolen, so liveness is a connect, not
// an HTTP answer: only "connection refused" (nobody listens) or a file that
// is not a socket counts as stale.
func clearStaleSocket(sock string) error {
	st, err := os.Lstat(sock)
	if errors.Is(err, os.ErrNotExist) {
		return os.MkdirAll(filepath.Dir(sock), 0o755)
	} else if err != nil {
		return fmt.Errorf("stat api socket: %w", err)
	}
	if st.Mode().Type() == os.ModeSocket {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		conn, err := dialUnix(ctx, sock)
		cancel()
		if err == nil {
			conn.Close()
			return fmt.Errorf("api socket %s already has a listener: another VMM lives there", sock)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("probe api socket %s: %w", sock, err)
		}
	}
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale api socket: %w", err)
	}
	return nil
}

// openLog opens the VMM's log for appending and returns its size before this
// launch, so an error quotes only what this launch wrote.
func openLog(path string) (*os.File, int64, error) {
	if path == "" {
		f, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		return f, 0, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, 0, fmt.Errorf("create log dir: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, 0, fmt.Errorf("open log: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("stat log: %w", err)
	}
	return f, st.Size(), nil
}

// logTail formats the end of what this launch wrote to the log, for errors.
func logTail(path string, from int64) string {
	if path == "" {
		return " (no log: LogPath empty)"
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf(" (log %s: %v)", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Sprintf(" (log %s: %v)", path, err)
	}
	start := max(from, st.Size()-logTailBytes)
	b, err := io.ReadAll(io.NewSectionReader(f, start, st.Size()-start))
	if err != nil {
		return fmt.Sprintf(" (log %s: %v)", path, err)
	}
	if len(b) == 0 {
		return fmt.Sprintf(" (log %s: empty)", path)
	}
	return fmt.Sprintf("; log %s ends:\n%s", path, b)
}

// vmmEnv is PATH and nothing else of the caller's environment, plus extra.
// A VMM must not inherit the daemon's secrets, proxies or locale.
func vmmEnv(extra []string) []string {
	path := os.Getenv("PATH")
	if path == "" {
		path = fallbackPATH
	}
	return append([]string{"PATH=" + path}, extra...)
}
