package jail

import (
	"syscall"
	"testing"
)

func TestExitCauseNeedsTheSignalAndTheCounter(t *testing.T) {
	signaled := func(s syscall.Signal) syscall.WaitStatus { return syscall.WaitStatus(s) }
	exited := func(code int) syscall.WaitStatus { return syscall.WaitStatus(code << 8) }
	for _, tc := range []struct {
		name string
		ws   syscall.WaitStatus
		oom  uint64
		want string
	}{
		{"SIGSYS", signaled(syscall.SIGSYS), 0, CauseSeccomp},
		{"SIGKILL after an OOM kill", signaled(syscall.SIGKILL), 1, CauseMemoryLimit},
		{"SIGKILL from someone else", signaled(syscall.SIGKILL), 0, ""},
		{"SIGTERM", signaled(syscall.SIGTERM), 3, ""},
		{"exit 1", exited(1), 1, ""},
	} {
		if got := ExitCause(tc.ws, tc.oom); got != tc.want {
			t.Errorf("%s: ExitCause = %q, want %q", tc.name, got, tc.want)
		}
	}
}
