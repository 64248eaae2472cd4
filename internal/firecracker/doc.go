// Package firecracker is the driver for a Firecracker-API VMM: the real
// `firecracker` binary or forkd's KVM-less emulator (`forkd vmm`). The two are
// interchangeable because this package only ever starts a process and speaks
// Firecracker's HTTP API to it over its Unix socket.
//
// It owns two things:
//   - the VMM process (Launch, Adopt, Process): started in its own session so
//     it outlives the daemon that launched it, with a minimal environment and
//     its output appended to a log file; re-attachable after a daemon restart;
//   - the API client (Client): typed requests with Firecracker's JSON field
//     names, per-call timeouts, and Firecracker's {"fault_message"} errors
//     surfaced as *APIError.
//
// It must never know about instances, snapshots directories, pagers or the
// data dir: callers pass every path in.
package firecracker
