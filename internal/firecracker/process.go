package firecracker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Process is a running VMM: launched by this process (a child) or adopted
// after a daemon restart (not a child).
type Process struct {
	Pid     int
	APISock string
	// Version is the VMM's release (GET /version at launch or adoption);
	// zero for a Process from AdoptForKill.
	Version Version

	// startTime is the process start time (clock ticks since boot, field 22
	// of /proc/<pid>/stat). With the pid it names one process: a pid reused
	// by another process never passes for the VMM.
	startTime uint64

	// For a child only: os is the handle Launch got, exited is closed once
	// the reaper goroutine's Wait returned, and waitErr is then its result.
	os      *os.Process
	exited  chan struct{}
	waitErr error

	// watch sees an adopted process exit (exit.go); nil for a child.
	watch *pidWatch
}

// Adopt re-attaches to a VMM started by an earlier daemon: the pid must be
// alive (not a zombie), its API socket must answer GET /version, and the
// socket must be that process's (SO_PEERCRED): a recycled pid that happens
// to be alive never passes for the VMM, so a later Kill cannot hit a
// stranger. The version is read again (not trusted from any record), so
// every request to the adopted VMM is built for what it really runs.
func Adopt(pid int, apiSock string) (*Process, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("adopt vmm pid %d: invalid pid", pid)
	}
	if err := unix.Kill(pid, 0); err != nil {
		return nil, fmt.Errorf("adopt vmm pid %d: %w", pid, err)
	}
	st, err := readStat(pid)
	if err != nil {
		return nil, fmt.Errorf("adopt vmm pid %d: %w", pid, err)
	}
	if st.state == 'Z' || st.state == 'X' {
		return nil, fmt.Errorf("adopt vmm pid %d: process has exited (state %c)", pid, st.state)
	}
	owner, err := socketOwner(apiSock)
	if err != nil {
		return nil, fmt.Errorf("adopt vmm pid %d: api socket: %w", pid, err)
	}
	if owner != pid {
		return nil, fmt.Errorf("adopt vmm pid %d: api socket %s belongs to pid %d", pid, apiSock, owner)
	}
	c := newClient(apiSock, Timeouts{Call: 2 * time.Second, Snapshot: defaultSnapshotTimeout})
	defer c.Close()
	v, err := c.Version(context.Background())
	if err != nil {
		return nil, fmt.Errorf("adopt vmm pid %d: api socket: %w", pid, err)
	}
	return &Process{Pid: pid, APISock: apiSock, Version: v, startTime: st.startTime, watch: newPidWatch()}, nil
}

// Client returns an API client of this VMM that already knows its version.
func (p *Process) Client() *Client { return NewClientVersion(p.APISock, p.Version) }

// AdoptForKill finds a VMM whose API may no longer answer (hung, or
// mid-crash) so it can be killed: pid must be alive and its command line
// must carry "--id id" (or "--id=id"), which is how Launch started it (directly or
// through a jailer; its socket path says nothing: every jailed VMM's is
// /vmm.sock). The Process is meant for Alive and Kill only.
func AdoptForKill(pid int, id, apiSock string) (*Process, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("adopt vmm pid %d for kill: invalid pid", pid)
	}
	st, err := readStat(pid)
	if err != nil {
		return nil, fmt.Errorf("adopt vmm pid %d for kill: %w", pid, err)
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return nil, fmt.Errorf("adopt vmm pid %d for kill: %w", pid, err)
	}
	if !hasArgPair(cmdline, "--id", id) {
		return nil, fmt.Errorf("adopt vmm pid %d for kill: its command line has no --id %s: not that VMM", pid, id)
	}
	return &Process{Pid: pid, APISock: apiSock, startTime: st.startTime, watch: newPidWatch()}, nil
}

// hasArgPair reports whether a NUL-separated command line holds flag
// followed by value, as two arguments or as one "flag=value" (both forms
// a VMM's flag parser takes, and the reconciler's scan finds).
func hasArgPair(cmdline []byte, flag, value string) bool {
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	for i, a := range args {
		if a == flag+"="+value || a == flag && i+1 < len(args) && args[i+1] == value {
			return true
		}
	}
	return false
}

// socketOwner is the pid that listens on a Unix socket (SO_PEERCRED of a
// connection to it: the credentials the listener had at listen(2)).
func socketOwner(path string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	conn, err := dialUnix(ctx, path)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	raw, err := conn.(*net.UnixConn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, fmt.Errorf("SO_PEERCRED: %w", credErr)
	}
	return int(cred.Pid), nil
}

// Alive reports whether the VMM process still runs (a zombie does not).
func (p *Process) Alive() bool {
	if p.exited != nil {
		select {
		case <-p.exited:
			return false
		default:
		}
	}
	st, err := readStat(p.Pid)
	if err != nil {
		return false
	}
	if p.startTime != 0 && st.startTime != p.startTime {
		return false // the pid now names another process
	}
	return st.state != 'Z' && st.state != 'X'
}

// Kill sends SIGKILL and waits until the process is gone (reaped, for a
// child; exited, for an adopted process), then removes its API socket.
// Killing a process that already exited is not an error.
func (p *Process) Kill(ctx context.Context) error {
	if p.exited != nil {
		// A child: the os.Process handle signals through a pidfd, so it can
		// never hit a reused pid, and the reaper tells us when it is gone.
		if err := p.os.Signal(unix.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
			return fmt.Errorf("kill vmm pid %d: %w", p.Pid, err)
		}
		select {
		case <-p.exited:
		case <-ctx.Done():
			return fmt.Errorf("kill vmm pid %d: waiting for exit: %w", p.Pid, ctx.Err())
		}
		return p.removeSocket()
	}
	if err := killAdopted(ctx, p.Pid, p.startTime); err != nil {
		return err
	}
	return p.removeSocket()
}

// killAdopted kills a non-child through a pidfd (which pins the process, so
// the signal cannot reach a reused pid) and polls the pidfd until it exits.
func killAdopted(ctx context.Context, pid int, startTime uint64) error {
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("kill vmm pid %d: pidfd_open: %w", pid, err)
	}
	defer unix.Close(fd)
	// The pidfd now pins this pid; check it is still our VMM.
	if st, err := readStat(pid); err != nil || (startTime != 0 && st.startTime != startTime) {
		return nil
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("kill vmm pid %d: %w", pid, err)
	}
	for {
		// A pidfd polls readable once the process has exited.
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 50)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("kill vmm pid %d: poll pidfd: %w", pid, err)
		}
		if n > 0 {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("kill vmm pid %d: waiting for exit: %w", pid, ctx.Err())
		}
	}
}

// removeSocket removes the dead VMM's socket file, unless something listens
// there again (a newer VMM launched on the same path).
func (p *Process) removeSocket() error {
	if p.APISock == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if conn, err := dialUnix(ctx, p.APISock); err == nil {
		conn.Close()
		return nil
	}
	if err := os.Remove(p.APISock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("kill vmm pid %d: remove api socket: %w", p.Pid, err)
	}
	return nil
}

type procStat struct {
	state     byte
	startTime uint64
}

// readStat reads the state and start time of /proc/<pid>/stat.
func readStat(pid int) (procStat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, fmt.Errorf("read /proc/%d/stat: %w", pid, err)
	}
	return parseStat(b)
}

func readStartTime(pid int) (uint64, error) {
	st, err := readStat(pid)
	return st.startTime, err
}

// parseStat parses "pid (comm) state ppid ... starttime ...": comm may hold
// spaces and parentheses, so fields are counted after the last ')'.
func parseStat(b []byte) (procStat, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("parse stat: no ')' in %q", b)
	}
	fields := strings.Fields(string(b[i+1:]))
	// fields[0] is field 3 (state); starttime is field 22.
	if len(fields) < 20 || len(fields[0]) != 1 {
		return procStat{}, fmt.Errorf("parse stat: %d fields after comm", len(fields))
	}
	start, err := strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("parse stat starttime %q: %w", fields[19], err)
	}
	return procStat{state: fields[0][0], startTime: start}, nil
}
