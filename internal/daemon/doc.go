// Package daemon is the forkd daemon process: configuration (flags, FORKD_*
// environment, an optional YAML file, defaults), the data directory, the
// listeners (the Unix socket <data>/forkd.sock, and an optional TCP address
// guarded by a bearer token), logging, metrics, and a clean shutdown.
//
// The daemon owns no VM logic: it builds the Backend (the instance manager,
// wired in wire.go) and serves it through internal/api. It must never kill a
// VM: VMMs and the pager run in their own sessions, so stopping or upgrading
// the daemon leaves them running, and shutdown only closes the listeners and
// the Backend.
package daemon
