package jail

import "syscall"

// Exit causes a jailed VMM's death can be put down to.
const (
	CauseSeccomp     = "seccomp violation: the VMM made a system call its filter denies (killed by SIGSYS)"
	CauseMemoryLimit = "memory limit: the VMM's cgroup ran out of memory and the kernel killed it (OOM kill)"
)

// ExitCause names why a jailed VMM ended, from its wait status and the
// oom_kill counter of its cgroup (Cgroup.OOMKills, read after the exit and
// before the cgroup is removed): CauseSeccomp for SIGSYS, which only the
// filter sends (SECCOMP_RET_KILL_PROCESS); CauseMemoryLimit for SIGKILL
// while the counter rose. "" when neither explains it (an exit, or a kill
// from someone else).
func ExitCause(ws syscall.WaitStatus, oomKills uint64) string {
	if !ws.Signaled() {
		return ""
	}
	switch {
	case ws.Signal() == syscall.SIGSYS:
		return CauseSeccomp
	case ws.Signal() == syscall.SIGKILL && oomKills > 0:
		return CauseMemoryLimit
	}
	return ""
}
