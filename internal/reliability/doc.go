// Package reliability is forkd's black-box reliability and security suite
// (RELIABILITY.md). Its tests start real `forkd serve` daemons in
// temp data dirs and drive them only through the API (api.NewClient), the
// way a user would: hostile input, crashes injected at every journal step
// (FORKD_TEST_CRASH_AT, see internal/instance/crashhook.go), killed pagers
// and VMMs, truncated mem-files, a full filesystem, and random concurrent
// load. After each, CheckInvariants says whether anything was lost, leaked
// or left shared.
//
// The non-test code here is the harness: Daemon (start, crash, restart a
// daemon process), the process scan that finds a data dir's VMMs, and the
// invariant checker. Nothing in forkd imports this package.
package reliability
