package pager

import (
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Counters are the pager's fault counters, globally and per session.
type Counters struct {
	// Faults is UFFD_EVENT_PAGEFAULTs served.
	Faults uint64 `json:"faults"`
	// Hits and Misses count page-cache lookups of data pages (faults and
	// populate); a miss reads the mem-file.
	Hits   uint64 `json:"hits"`
	Misses uint64 `json:"misses"`
	// ZeroPages is pages installed as zeros because the mem-file has a hole
	// there or the page read back all zeros. Every count of pages here is
	// in 4 KiB pages, whatever the regions' page size (a 2 MiB install
	// counts 512); Faults, Hits, Misses, RemovedFaults, Deferred, probes
	// and ColdReads count events, one per region page.
	ZeroPages uint64 `json:"zero_pages"`
	// RemovedFaults is faults in ranges the VMM discarded (UFFD_EVENT_REMOVE),
	// served as zeros: one per zero page installed, so a fault the kernel
	// reports again (a signal interrupted its thread) is not counted twice.
	RemovedFaults uint64 `json:"removed_faults"`
	// Removes is UFFD_EVENT_REMOVE events applied.
	Removes uint64 `json:"removes"`
	// Deferred is installs that got EAGAIN and were retried after the
	// pending events were read.
	Deferred uint64 `json:"deferred"`
	// PopulatedPages is pages installed by populate, not by a fault.
	PopulatedPages uint64 `json:"populated_pages"`
	// PrefetchedPages is pages installed by working-set replay, not by a
	// fault (contiguous pages go in one UFFDIO_COPY or ZEROPAGE).
	PrefetchedPages uint64 `json:"prefetched_pages"`
	// PrefetchProbes is region pages of a recording replay leaves for the
	// guest to fault, one in probeStride (prefetch.go), to measure how much
	// of a recording the guest uses; PrefetchProbeFaults is how many of
	// them it faulted.
	PrefetchProbes      uint64 `json:"prefetch_probes"`
	PrefetchProbeFaults uint64 `json:"prefetch_probe_faults"`
	// ColdReads is faults whose page was read from the mem-file off the
	// session goroutine: neither the pager's cache nor the kernel's page
	// cache held it, and the session served other faults and replay while
	// the disk worked.
	ColdReads uint64 `json:"cold_reads"`
	// MappedFaults is faults of 2 MiB pages that missed the pager's cache
	// (each is also a miss) and were served straight from the kernel's
	// page cache through a mapping of the mem-file, without a copy into
	// the pager's heap and without caching the page: a lone VM's, which
	// never asks for a page twice (docs/architecture.md §8).
	MappedFaults uint64 `json:"mapped_faults"`
	// BackingBytes and BackingNanos are mem-file reads (pread) and their time.
	BackingBytes uint64 `json:"backing_bytes"`
	BackingNanos uint64 `json:"backing_nanos"`
	// CopyErrors counts UFFDIO_COPY/ZEROPAGE results other than success by
	// errno name (EEXIST and EAGAIN are expected and handled).
	CopyErrors map[string]uint64 `json:"copy_errors"`
	// FaultLatency is the service time of a fault: from reading the event to
	// the page being installed (not the VMM's whole round trip).
	FaultLatency Histogram `json:"fault_latency"`
}

// HitRate is Hits / (Hits + Misses), or 0 with no lookups.
func (c Counters) HitRate() float64 {
	if c.Hits+c.Misses == 0 {
		return 0
	}
	return float64(c.Hits) / float64(c.Hits+c.Misses)
}

// Stats is GET /stats.
type Stats struct {
	Version string `json:"version"`
	Pid     int    `json:"pid"`
	Counters
	ActiveSessions   int           `json:"active_sessions"`
	SessionsTotal    uint64        `json:"sessions_total"`
	CacheBytes       int64         `json:"cache_bytes"`
	CacheBudgetBytes int64         `json:"cache_budget_bytes"`
	CacheEntries     int           `json:"cache_entries"`
	Evictions        uint64        `json:"evictions"`
	Draining         bool          `json:"draining"`
	Sessions         []SessionInfo `json:"sessions"`
}

// SessionInfo is one session: an entry of GET /stats' sessions and the
// reply of GET /sessions/{id}.
type SessionInfo struct {
	SessionID   string `json:"session_id"`
	CacheKey    string `json:"cache_key"`
	BackingPath string `json:"backing_path"`
	// State is "waiting" (for the VMM to connect), "handshake", "serving"
	// or "populated".
	State string `json:"state"`
	// Pid is the VMM's pid from SO_PEERCRED (0 before it connects).
	Pid         int    `json:"pid"`
	Regions     int    `json:"regions"`
	MemoryBytes uint64 `json:"memory_bytes"`
	Counters
	// Prefetch is the session's working-set recording or replay (nil for
	// neither).
	Prefetch *SessionPrefetch `json:"prefetch,omitempty"`
}

// SessionPrefetch is one session's working-set recording or replay.
type SessionPrefetch struct {
	// Mode is "record" (logging first faults), "replay" (installing a
	// recording), or "none" (a recording was asked for and cannot be used:
	// see Error).
	Mode string `json:"mode"`
	// PagesRecorded is, recording, the first faults logged so far;
	// replaying, the pages of the recording (4 KiB units).
	PagesRecorded uint64 `json:"pages_recorded"`
	// PagesPrefetched is pages replay installed (4 KiB units, whatever the
	// region's page size: comparable with PagesRecorded and across VMs).
	PagesPrefetched uint64 `json:"pages_prefetched"`
	// PagesWasted estimates the prefetched pages the guest has not used:
	// PagesPrefetched × the share of probes it has not faulted. An
	// installed page is invisible to the pager once the guest reads it, so
	// the probes, a sample of its region pages left to fault, are how it
	// knows (4 KiB units).
	PagesWasted uint64 `json:"pages_wasted"`
	// WorkingSetMs is, once replay has installed every page it will, the
	// time from the session's creation until then (0 before).
	WorkingSetMs int64 `json:"working_set_ms"`
	// Done is set once replay has nothing left to install.
	Done  bool   `json:"done"`
	Error string `json:"error,omitempty"`
}

// Histogram is a latency histogram with fixed bucket bounds.
type Histogram struct {
	// Buckets are cumulative, as Prometheus wants them: Count of
	// observations ≤ LeSeconds. The last bound is +Inf (LeSeconds 0 and
	// Inf true).
	Buckets    []Bucket `json:"buckets"`
	Count      uint64   `json:"count"`
	SumSeconds float64  `json:"sum_seconds"`
	// P50Seconds and P99Seconds are Quantile(0.5) and Quantile(0.99):
	// upper bounds of the buckets they fall in.
	P50Seconds float64 `json:"p50_seconds"`
	P99Seconds float64 `json:"p99_seconds"`
}

// Bucket is one cumulative histogram bucket.
type Bucket struct {
	LeSeconds float64 `json:"le_seconds"`
	Inf       bool    `json:"inf,omitempty"`
	Count     uint64  `json:"count"`
}

// Quantile estimates the q-quantile (0..1) from the buckets (upper bound of
// the bucket it falls in), in seconds.
func (h Histogram) Quantile(q float64) float64 {
	if h.Count == 0 {
		return 0
	}
	rank := uint64(q * float64(h.Count))
	for _, b := range h.Buckets {
		if b.Count > rank || b.Count == h.Count {
			if b.Inf {
				break
			}
			return b.LeSeconds
		}
	}
	if n := len(h.Buckets); n > 1 {
		return h.Buckets[n-2].LeSeconds
	}
	return 0
}

// latencyBounds are the histogram's upper bounds: a 4 KiB UFFDIO_COPY is
// ~2 µs and a cold backing read from disk ~100 µs.
var latencyBounds = [...]time.Duration{
	1 * time.Microsecond, 2 * time.Microsecond, 5 * time.Microsecond,
	10 * time.Microsecond, 20 * time.Microsecond, 50 * time.Microsecond,
	100 * time.Microsecond, 200 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2 * time.Millisecond, 5 * time.Millisecond,
	10 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond,
	time.Second,
}

// counters is the live, atomic form of Counters.
type counters struct {
	faults, hits, misses, zeroPages, removedFaults, removes, deferred atomic.Uint64
	populated, backingBytes, backingNanos                             atomic.Uint64
	prefetched, probes, probeFaults, coldReads, mappedFaults          atomic.Uint64

	latency [len(latencyBounds) + 1]atomic.Uint64 // per bucket, not cumulative
	latSum  atomic.Uint64                         // nanoseconds

	mu         sync.Mutex
	copyErrors map[string]uint64 // guarded by mu
}

func (c *counters) observe(d time.Duration) {
	i := sort.Search(len(latencyBounds), func(i int) bool { return d <= latencyBounds[i] })
	c.latency[i].Add(1)
	c.latSum.Add(uint64(d))
}

func (c *counters) copyError(errno unix.Errno) {
	name := unix.ErrnoName(errno)
	if name == "" {
		name = errno.Error()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.copyErrors == nil {
		c.copyErrors = make(map[string]uint64)
	}
	c.copyErrors[name]++
}

func (c *counters) snapshot() Counters {
	out := Counters{
		Faults: c.faults.Load(), Hits: c.hits.Load(), Misses: c.misses.Load(),
		ZeroPages: c.zeroPages.Load(), RemovedFaults: c.removedFaults.Load(),
		Removes: c.removes.Load(), Deferred: c.deferred.Load(),
		PopulatedPages:  c.populated.Load(),
		PrefetchedPages: c.prefetched.Load(), PrefetchProbes: c.probes.Load(), PrefetchProbeFaults: c.probeFaults.Load(),
		ColdReads: c.coldReads.Load(), MappedFaults: c.mappedFaults.Load(),
		BackingBytes: c.backingBytes.Load(), BackingNanos: c.backingNanos.Load(),
		CopyErrors: map[string]uint64{},
	}
	c.mu.Lock()
	for k, v := range c.copyErrors {
		out.CopyErrors[k] = v
	}
	c.mu.Unlock()
	var cum uint64
	for i := range c.latency {
		cum += c.latency[i].Load()
		b := Bucket{Count: cum}
		if i < len(latencyBounds) {
			b.LeSeconds = latencyBounds[i].Seconds()
		} else {
			b.Inf = true
		}
		out.FaultLatency.Buckets = append(out.FaultLatency.Buckets, b)
	}
	out.FaultLatency.Count = cum
	out.FaultLatency.SumSeconds = time.Duration(c.latSum.Load()).Seconds()
	out.FaultLatency.P50Seconds = out.FaultLatency.Quantile(0.5)
	out.FaultLatency.P99Seconds = out.FaultLatency.Quantile(0.99)
	return out
}
