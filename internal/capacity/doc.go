// Package capacity decides, before forkd promises a VM, whether the host
// can hold it: one call with too much memory once ran a standby for four
// minutes and brought the host-wide OOM killer (a 64 GiB, 32-vCPU VM on a
// 24 GiB machine). It compares each request with:
//
//   - one VM: its guest RAM against MemTotal × max_vm_memory_ratio and
//     max_memory_mib, its vCPUs against max_vcpus;
//   - every running VM: their guest RAM together against MemTotal ×
//     memory_overcommit (default 8: forks share their clean pages through
//     the page cache: 25 running forks of a 4 GiB VM use 0.6-1.3 GiB in
//     the fork-burst benchmark, not 100 GiB), and their number against
//     max_running_vms;
//   - the data dir's filesystem: the bytes the operation will write must be
//     free (plus a small reserve for the database and logs).
//
// A request that does not fit is refused with ErrInsufficient naming the
// resource and the shortfall (409 insufficient_resources at the API). The
// ledger reserves what it admitted until the caller releases it, so two concurrent requests cannot both take the last
// of a resource. It knows nothing of VMs' files or states: the manager
// says what runs and what an operation will write.
//
// This is capacity admission: whether the host has room. It is not the
// API's limit on heavy operations in flight (max_heavy_ops, 429 busy),
// which bounds how many run at once whatever they cost.
package capacity
