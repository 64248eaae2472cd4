package instance

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/forkd/forkd/internal/firecracker"
)

// vmmProc is one VMM process seen in /proc: its --id and --api-sock.
type vmmProc struct {
	pid      int
	id, sock string
}

// scanVMMs lists every process whose command line has both --api-sock and
// --id: a VMM as the driver starts it (directly, or a jailer or the VMM it
// became). The reconciler takes one scan before settling the instances,
// so startup reads each process's command line once however many
// instances there are.
func scanVMMs() []vmmProc {
	var out []vmmProc
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if p, ok := parseVMMCmdline(b); ok {
			p.pid = pid
			out = append(out, p)
		}
	}
	return out
}

// parseVMMCmdline reads --id and --api-sock (each "--flag value" or
// "--flag=value") from a NUL-separated command line.
func parseVMMCmdline(cmdline []byte) (vmmProc, bool) {
	var p vmmProc
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	for i := 0; i < len(args); i++ {
		name, value, hasValue := strings.Cut(args[i], "=")
		if !hasValue && i+1 < len(args) {
			value = args[i+1]
		}
		switch {
		case name == "--id" && p.id == "":
			p.id = value
		case name == "--api-sock" && p.sock == "":
			p.sock = value
		}
	}
	return p, p.id != "" && p.sock != ""
}

// vmmsByID groups a scan by --id. A VMM is recognised by its --id, never by
// its socket path: every jailed VMM has the same one inside its jail.
func vmmsByID(scan []vmmProc) map[string][]int {
	out := map[string][]int{}
	for _, p := range scan {
		out[p.id] = append(out[p.id], p.pid)
	}
	return out
}

// killUnrecordedVMMs kills every VMM process started for instance id (found
// by its --id in vmms) except the one the manager adopted for it, if any,
// and waits until each has exited (at most unrecordedExitWait each).
// The journal learns a VMM's pid only after Launch returns, so a crash
// between a start's or restore's launch and its next step leaves a VMM no
// record names: without this sweep it would run forever, and a later
// restore would start a second VMM for the same guest (found by the
// reliability suite, TestCrashUnderLoadLosesNothing). Instance ids are 96
// random bits, so a VMM of another data dir never carries one of ours.
//
// The reconciler calls it for each instance before it clears the guest dir
// and frees the jail: a VMM is gone only once it has exited, not when it
// is sent SIGKILL. One with a large memory to tear down, or blocked, can
// take a while; until then it still holds its uid, its cgroup and its
// guest dir, and it could still write into that dir. (A VMM in the
// kernel when its SIGKILL came, on a loaded host, was seen still exiting
// by the suite's invariant check after the daemon served.) The kill goes
// through a pidfd taken after the process's command line is checked
// again, so a pid reused since the scan is never signalled.
func (m *Manager) killUnrecordedVMMs(ctx context.Context, id string, vmms map[string][]int) {
	keep := 0
	if p := m.proc(id); p != nil {
		keep = p.Pid
	}
	for _, pid := range vmms[id] {
		if pid == keep {
			continue
		}
		// No socket: the path is the instance's, which a kept VMM may own.
		p, err := firecracker.AdoptForKill(pid, id, "")
		if err != nil {
			continue // exited since the scan, or the pid names another process now
		}
		m.log.Warn("reconcile: killing a VMM no record names", "instance", id, "pid", pid)
		kctx, cancel := context.WithTimeout(ctx, unrecordedExitWait)
		if err := p.Kill(kctx); err != nil {
			m.log.Error("reconcile: a VMM no record names has not exited; its jail is freed without it", "instance", id, "pid", pid, "err", err)
		}
		cancel()
	}
}

// unrecordedExitWait bounds the wait for one killed VMM to exit: a process
// stuck in the kernel must not hold the daemon's start for ever.
const unrecordedExitWait = 10 * time.Second
