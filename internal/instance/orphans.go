package instance

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/forkd/forkd/internal/guestdir"
)

// killUnrecordedVMMs kills every VMM process started for guest g (found by
// its --api-sock) except the one the manager adopted for the instance, if
// any. The journal learns a VMM's pid only after Launch returns, so a crash
// between a start's or restore's launch and its next step leaves a VMM no
// record names: without this sweep it would run forever, and a later
// restore would start a second VMM on the same socket path (found by the
// reliability suite, TestCrashUnderLoadLosesNothing). Run by the reconciler
// once per instance, after it has settled that instance.
func (m *Manager) killUnrecordedVMMs(g guestdir.Guest, id string) {
	keep := 0
	if p := m.proc(id); p != nil {
		keep = p.Pid
	}
	sock := g.VMMSock()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == keep || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "--api-sock" && args[i+1] == sock {
				m.log.Warn("reconcile: killing a VMM no record names", "instance", id, "pid", pid, "api_sock", sock)
				syscall.Kill(pid, syscall.SIGKILL)
				break
			}
		}
	}
}
