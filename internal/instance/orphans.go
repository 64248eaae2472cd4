package instance

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
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
// by its --id in vmms) except the one the manager adopted for it, if any.
// The journal learns a VMM's pid only after Launch returns, so a crash
// between a start's or restore's launch and its next step leaves a VMM no
// record names: without this sweep it would run forever, and a later
// restore would start a second VMM for the same guest (found by the
// reliability suite, TestCrashUnderLoadLosesNothing). Run by the reconciler
// once per instance, after it has settled that instance. Instance ids are
// 96 random bits, so a VMM of another data dir never carries one of ours.
func (m *Manager) killUnrecordedVMMs(id string, vmms map[string][]int) {
	keep := 0
	if p := m.proc(id); p != nil {
		keep = p.Pid
	}
	for _, pid := range vmms[id] {
		if pid == keep {
			continue
		}
		// Re-read the command line: the pid may have been reused since
		// the scan.
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
		if p, ok := parseVMMCmdline(b); err != nil || !ok || p.id != id {
			continue
		}
		m.log.Warn("reconcile: killing a VMM no record names", "instance", id, "pid", pid)
		syscall.Kill(pid, syscall.SIGKILL)
	}
}
