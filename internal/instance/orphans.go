package instance

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/forkd/forkd/internal/guestdir"
)

// vmmsBySocket scans /proc once for VMM processes: every process started
// with --api-sock PATH, by PATH. The reconciler takes it before settling the
// instances, so startup reads each process's command line once however many
// instances there are.
func vmmsBySocket() map[string][]int {
	out := map[string][]int{}
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
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "--api-sock" {
				out[args[i+1]] = append(out[args[i+1]], pid)
				break
			}
		}
	}
	return out
}

// killUnrecordedVMMs kills every VMM process started for guest g (found by
// its --api-sock in vmms) except the one the manager adopted for the
// instance, if any. The journal learns a VMM's pid only after Launch
// returns, so a crash between a start's or restore's launch and its next
// step leaves a VMM no record names: without this sweep it would run
// forever, and a later restore would start a second VMM on the same socket
// path (found by the reliability suite, TestCrashUnderLoadLosesNothing).
// Run by the reconciler once per instance, after it has settled that
// instance.
func (m *Manager) killUnrecordedVMMs(g guestdir.Guest, id string, vmms map[string][]int) {
	keep := 0
	if p := m.proc(id); p != nil {
		keep = p.Pid
	}
	for _, pid := range vmms[g.VMMSock()] {
		if pid == keep {
			continue
		}
		// Re-read the command line: the pid may have been reused since
		// the scan.
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
		if err != nil || !strings.Contains(string(b), "\x00"+g.VMMSock()) {
			continue
		}
		m.log.Warn("reconcile: killing a VMM no record names", "instance", id, "pid", pid, "api_sock", g.VMMSock())
		syscall.Kill(pid, syscall.SIGKILL)
	}
}
