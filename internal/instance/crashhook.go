package instance

import (
	"os"
	"strings"
	"syscall"
)

// CrashAtEnv names the crash-injection hook used by the reliability suite
// (internal/reliability). When the daemon's environment sets
// FORKD_TEST_CRASH_AT=<op kind>:<step> (e.g. "standby:creating",
// "fork:begun", "compress:compressed"), the daemon SIGKILLs itself the moment
// that journal step is durable: the crash a power cut or OOM kill would
// cause, at a chosen point. Unset (the default, and always in production) it
// does nothing. A kind or step of "*" matches any.
const CrashAtEnv = "FORKD_TEST_CRASH_AT"

// crashPoint kills the process with SIGKILL if CrashAtEnv names kind:step.
// It reads the environment on each call (no package state); the cost is one
// getenv per journal step. kind:step must be declared in journalSteps
// (steps.go): an undeclared crash point panics, as it would have no crash
// case.
func crashPoint(kind, step string) {
	if err := declaredStep(kind, step); err != nil {
		panic(err)
	}
	want := os.Getenv(CrashAtEnv)
	if want == "" {
		return
	}
	k, s, _ := strings.Cut(want, ":")
	if (k == kind || k == "*") && (s == step || s == "*") {
		// SIGKILL, not exit: no deferred function, no flush, no cleanup.
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is delivered asynchronously; never continue
	}
}
