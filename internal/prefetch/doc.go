// Package prefetch is forkd's working-set recording: which pages of a
// mem-file a restored VM touched first, and in what order, so that later
// restores of the same bytes can bring those pages in before the guest asks.
//
// It owns:
//   - the recording file (format.go): a small, immutable, versioned file
//     named after the snapshot cache key it belongs to, holding the page
//     indices in first-touch order, the key, the mem-file's size and a
//     checksum. Load refuses a file of another key or size (ErrStale) and a
//     damaged one (ErrCorrupt): a stale recording is never used;
//   - plans (plan.go): the recorded pages merged into contiguous runs,
//     ordered by the first touch of any page in them, for the pager's
//     UFFDIO_COPY runs and for readahead ranges;
//   - the host-side mechanics (readahead.go, mapped.go): reading runs into
//     the page cache, page-cache residency of runs (mincore over a mapping
//     of the file), and the pages of a file another process has
//     mapped (/proc/PID/maps and /proc/PID/pagemap), sampled over time to
//     record a File-restored VM's working set in order.
//
// It knows no VMs, instances, sessions or pager protocol: the pager and the
// instance manager call it with paths, pids and keys. It never writes a
// mem-file and never reads guest memory: a recording holds page numbers,
// never page contents.
//
// Why File recordings read the VMM's page tables and not the page cache:
// mincore reports the page cache, which every process shares. Right after a
// standby or a snapshot the mem-file's every page is cached (the snapshot
// write put them there), and siblings of a fork fill it too, so residency
// would record the whole file. The pages a VMM has mapped (pagemap's present
// bit over its MAP_PRIVATE mapping of the mem-file: read pages map the
// page-cache page, written ones its private copy) are this VM's own touches.
// The kernel's fault-around maps up to 16 already-cached neighbours of a
// faulting page, so a File recording may hold a few pages the guest did not
// touch itself; that is counted as waste like any other.
package prefetch
