// Package emulator is `forkd vmm`: a VMM process without KVM that speaks
// Firecracker's HTTP API on a Unix socket and treats guest memory exactly as
// Firecracker does, so every memory mechanism of forkd (hardlinked
// mem-files, the unshare guard, in-place Diff merges, the userfaultfd pager,
// page-cache sharing) runs for real where there is no KVM.
//
// It owns: the Firecracker command line (--api-sock, --id, --log-path,
// --level), the API subset forkd's driver uses with Firecracker's field
// names, status codes (204 on success, 400 with {"fault_message": "..."} on
// refusal) and ordering rules, guest RAM as real mappings (anonymous at
// boot, MAP_PRIVATE of the mem-file on a File load, anonymous + userfaultfd
// with Firecracker's handshake on a Uffd load), Firecracker's snapshot file
// semantics, and a self-checking guest workload. It must never execute the
// kernel image (any existing file is accepted) and never write a snapshot
// file other than the two paths a /snapshot/create names.
//
// # Firecracker releases
//
// --firecracker-version picks the release the emulator stands for (1.10 to
// 1.16; versions.go). GET /version reports it, and every request body is
// checked against that release's request structs before anything runs
// (schema.go): a field the release does not know is refused with the 400
// and serde message that release would send, so a driver that sends a
// field too new for the VMM fails here as it would on a real host. The
// release also decides the snapshot data version written into the vmstate
// and required of one being loaded, and the few behaviours that changed
// (Diff without dirty tracking from 1.13; the Uffd handshake's page_size,
// EVENT_REMOVE and socket lifetime from 1.12).
//
// # Guest memory layout
//
// RAM is one region, or two when it is larger than 3 GiB (Firecracker's x86
// layout: the MMIO hole at 3 GiB, the rest from 4 GiB). Regions are
// contiguous in the mem-file. The hidden boot arg forkd.split_mib=N splits at
// N MiB instead, so tests reach the multi-region code paths with small VMs.
//
// With machine-config huge_pages "2M" RAM is 2 MiB hugetlbfs pages
// (hugepages.go): mapped MAP_HUGETLB|MAP_HUGE_2MB with Firecracker's other
// flags (NORESERVE included), every page claimed from the host's pool at
// InstanceStart so a short pool fails the start instead of a later fault,
// restored only through Uffd (a File load is refused as Firecracker refuses
// it) with 2 MiB announced in the handshake. The guest's own page, the dirty
// log and a Diff stay 4 KiB.
//
// Page 0 is the workload header (magic, generation, lineage, layout and one
// step counter per vCPU), then the version table (16 bytes per working-set
// page: version, lineage), then the working-set pages, then free pages.
// Every working-set page starts with (page index, version, lineage,
// checksum) and is filled from a PRNG seeded by those; the checksum covers
// the whole page.
//
// # The workload
//
// While Resumed, one goroutine per vCPU runs on a locked OS thread. vCPU k
// owns the working-set pages whose index is k mod vcpu_count, so vCPUs never
// race. Each step it checks the header (magic, its step counter equals the
// one in its "registers"), reads one page of its share, verifies it against
// the version table, and with probability write_pct writes a new version.
// Any mismatch is an integrity error: counted, the first one kept and
// logged, and reported by GET /guest. The step counters also live in the
// vmstate, so a restore whose memory and vmstate come from different moments
// is an integrity error at the first step. Pausing stops every vCPU at a
// step boundary. With discard_pct, steps also use free pages as scratch and
// discard them as a balloon would (MADV_DONTNEED on anonymous/uffd memory,
// an anonymous MAP_FIXED mapping over file-backed memory), then check they
// read back as zeros: this sends UFFD_EVENT_REMOVE to a pager and catches
// one that resurrects file data into removed ranges.
//
// Boot args (in boot_args of PUT /boot-source, space separated):
//
//	forkd.ws_mib=N        working set in MiB (default: min(64, half of RAM))
//	forkd.write_pct=P     percentage of steps that write a page (default 20)
//	forkd.rate=N          steps per second for the whole VM, 0 = unpaced (default 2000)
//	forkd.seed=S          PRNG seed (default 1)
//	forkd.discard_pct=P   percentage of steps that use or discard a free page (default 0)
//	forkd.split_mib=N     split RAM into two regions at N MiB (testing; default 3072)
//	forkd.load_seed=1     every load picks its pages with a seed of its own (from its
//	                      lineage): forks touch the working set in different orders
//	forkd.disk_write=1    at every boot and load the guest writes a record of that run
//	                      into the first 512 bytes of its root drive and flushes it
//	                      (Firecracker writes a drive in place: a shared disk shows it)
//
// Limits, as in Firecracker: a vCPU blocked on a uffd fault whose handler
// died blocks forever (and so does PATCH /vm Paused); each discard of a page
// of file-backed memory splits its mapping, so very long runs with
// discard_pct on a File restore are bounded by vm.max_map_count.
//
// # Snapshot files
//
// PUT /snapshot/create writes as Firecracker does, in its order: the
// vmstate first, in place (create|write|truncate, fsync: no temp file, no
// rename), then the mem-file (no truncation of a right-sized file; Full
// writes every page, Diff only the pages of the dirty log it takes; fsync).
// Neither write is atomic: a crash leaves a torn vmstate, which a load
// refuses (the vmstate is format version | JSON body (machine, devices,
// regions, workload and step counters) | CRC64-ECMA), or a whole vmstate
// beside an incomplete mem-file, which only the caller's journal can tell.
// A load failure leaves the process unusable (every later call is refused).
//
// # Network
//
// Each PUT /network-interfaces opens its TAP by name in the process's
// network namespace (internal/guestnet, with Firecracker's TUNSETIFF
// flags), and a load reopens them by the names the vmstate holds, after
// network_overrides. The guest's identity (MAC per NIC, the address of
// the ip= boot argument) is decided at InstanceStart and kept in page 0 at
// hNet (net.go); a loaded guest builds its stack from what its memory says
// when it first runs. The stack is up and listening before the call that
// runs the guest returns; pausing stops its frames both ways.
//
// # Emulator-only API
//
// GET /guest returns the workload's counters for this process:
//
//	{"ticks", "pages_read", "pages_written", "pages_verified",
//	 "integrity_errors", "first_integrity_error" ("" when none),
//	 "steps" (the guest's step counter, carried across snapshots),
//	 "generation", "lineage", "discards",
//	 "boot_id" (random per boot, kept in page 0: a fork reports its source's)}
//
// The guest's own HTTP server (port 80 on its address) answers GET / with
// the same JSON.
package emulator
