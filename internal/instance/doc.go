// Package instance is forkd's VM manager: it implements api.Service over the
// store (metadata + journal), guestdir (paths), memfile (sharing, cloning,
// the unshare guard, compression), the firecracker driver (either VMM) and
// the pager client. It owns the lifecycle state machine of
// docs/architecture.md §5.
//
// # Locks
//
// Each instance has a sync.RWMutex (Manager.instanceLock). standby, restore,
// stop, delete, pause, resume, start, snapshot-of-a-running-VM and live forks
// take it for writing; a fork or snapshot of a Standby (or Stopped) source
// takes it for reading, so forks of one source run in parallel while a
// standby/restore of that source waits. Each snapshot has a RWMutex too:
// delete and the end of compression write, forks read; plus a mutex that
// serialises materialising a compressed snapshot's raw mem-file.
// Lock order: source instance → new fork instance → snapshot → Manager.mu.
// Manager.mu is a leaf guarding only the maps.
//
// # Crash safety
//
// Every multi-step operation writes a journal entry before it acts and
// records each step; Reconcile (run once at start) finishes or rolls back
// what a crash left open, removes temp files and half-made directories, and
// re-adopts the VMMs that kept running (they run in their own session).
//
// # The memory invariants (docs/architecture.md §3)
//
// Forks hardlink mem-files (memfile.ShareInto; fork_strategy reflink and
// copy exist only for benchmarks); the only in-place writer
// of a mem-file is a Diff snapshot into an instance's own base, done by
// standby, snapshot-of-running and live fork through one function
// (writeSnapshot), which runs the unshare guard first. Forks link a sealed
// disk too; every VMM launch runs the disk guard first (launch,
// unshareDisk), so a VMM writes only a disk no other name links.
//
// # VMMs and the pager
//
// A VMM (real firecracker, or `forkd vmm`, chosen by ResolveVMM) is launched
// in its own session with the guest dir as its working directory, and the
// rootfs is given to it as a relative path: the vmstate records that relative
// path, so a fork's VMM opens the fork's own disk and no vmstate rewriting
// is needed. VMMs outlive the daemon; Reconcile re-adopts them. The host
// pager (internal/pager) is started lazily, detached, on the first Uffd
// restore; if it cannot start only Uffd restores fail.
package instance
