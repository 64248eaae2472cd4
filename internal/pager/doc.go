// Package pager is forkd's userfaultfd pager: one long-lived process per
// host and version (`forkd pager serve --dir <data>/pager/<version>`) that
// serves the guest memory of VMs restored with Firecracker's Uffd backend
// (docs/architecture.md §8).
//
// It owns:
//   - the control API on <dir>/control.sock (server.go, api.go) and its
//     client for the daemon (client.go, ensure.go: find or start the pager
//     of our version, detached, and drain older ones);
//   - sessions (session.go): one per VM restore, a socket the VMM connects
//     to with Firecracker's handshake, then the fault loop (serve.go) that
//     follows the event rules (drain to EAGAIN, REMOVE first and remembered,
//     EEXIST ok, EAGAIN deferred, ESRCH ends) until the VMM closes the socket;
//   - the process-wide page cache (cache.go), keyed by (cache key, offset),
//     sharded, CLOCK-evicted under a byte budget;
//   - stats (stats.go) and their Prometheus form (metrics.go).
//
// A cache key must name immutable content: the cache never rereads a page
// it holds, so two files under one key must be byte-identical (hardlinks of
// one snapshot's mem-file are).
//
// It must never write a mem-file (they are shared by hardlinks and the
// snapshot store) and never serve file data into a range the VMM removed.
// The uffd syscalls themselves live in internal/uffd.
package pager
