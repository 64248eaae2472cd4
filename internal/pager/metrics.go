package pager

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// NewCollector returns a Prometheus collector of the pager's stats under
// forkd_pager_*, fetched on every scrape (pass Client.Stats: the daemon
// re-exports the out-of-process pager; Server.Stats works in-process).
// A failed fetch reports forkd_pager_up 0 and nothing else.
func NewCollector(fetch func(context.Context) (Stats, error)) prometheus.Collector {
	return &collector{fetch: fetch}
}

type collector struct {
	fetch func(context.Context) (Stats, error)
}

var (
	descUp            = prometheus.NewDesc("forkd_pager_up", "Whether the pager answered the stats request.", nil, nil)
	descFaults        = prometheus.NewDesc("forkd_pager_faults_total", "Page faults served.", nil, nil)
	descHits          = prometheus.NewDesc("forkd_pager_cache_hits_total", "Page cache hits.", nil, nil)
	descMisses        = prometheus.NewDesc("forkd_pager_cache_misses_total", "Page cache misses (mem-file reads).", nil, nil)
	descZero          = prometheus.NewDesc("forkd_pager_zero_pages_total", "Pages installed as zeros (holes, all-zero pages), in 4 KiB pages.", nil, nil)
	descRemoved       = prometheus.NewDesc("forkd_pager_removed_faults_total", "Faults in ranges the VMM discarded, served as zeros.", nil, nil)
	descPopulated     = prometheus.NewDesc("forkd_pager_populated_pages_total", "Pages installed by populate, in 4 KiB pages.", nil, nil)
	descBackingBytes  = prometheus.NewDesc("forkd_pager_backing_read_bytes_total", "Bytes read from mem-files.", nil, nil)
	descBackingSecs   = prometheus.NewDesc("forkd_pager_backing_read_seconds_total", "Time spent reading mem-files.", nil, nil)
	descCopyErrors    = prometheus.NewDesc("forkd_pager_copy_errors_total", "UFFDIO_COPY/ZEROPAGE results other than success.", []string{"errno"}, nil)
	descLatency       = prometheus.NewDesc("forkd_pager_fault_duration_seconds", "Fault service time, from reading the event to the page installed.", nil, nil)
	descSessions      = prometheus.NewDesc("forkd_pager_sessions_active", "Sessions open.", nil, nil)
	descCacheBytes    = prometheus.NewDesc("forkd_pager_cache_bytes", "Bytes held by the page cache.", nil, nil)
	descCacheBudget   = prometheus.NewDesc("forkd_pager_cache_budget_bytes", "The page cache's byte budget.", nil, nil)
	descEvictions     = prometheus.NewDesc("forkd_pager_cache_evictions_total", "Page cache evictions.", nil, nil)
	descSessionsTotal = prometheus.NewDesc("forkd_pager_sessions_total", "Sessions created.", nil, nil)
	descPrefetched    = prometheus.NewDesc("forkd_pager_prefetched_pages_total", "Pages installed by working-set replay, not by a fault, in 4 KiB pages.", nil, nil)
	descProbes        = prometheus.NewDesc("forkd_pager_prefetch_probes_total", "Recorded pages replay left for the guest to fault (the waste sample).", nil, nil)
	descProbeFaults   = prometheus.NewDesc("forkd_pager_prefetch_probe_faults_total", "Probes the guest faulted: recorded pages it used.", nil, nil)
	descColdReads     = prometheus.NewDesc("forkd_pager_cold_reads_total", "Faults whose page was read from disk off the session goroutine (neither cache held it).", nil, nil)
	descMappedFaults  = prometheus.NewDesc("forkd_pager_mapped_faults_total", "Faults of 2 MiB pages that missed the pager's cache and were served from the kernel's page cache through a mapping of the mem-file (also counted as misses).", nil, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descUp, descFaults, descHits, descMisses, descZero, descRemoved,
		descPopulated, descBackingBytes, descBackingSecs, descCopyErrors, descLatency, descSessions,
		descCacheBytes, descCacheBudget, descEvictions, descSessionsTotal, descPrefetched, descProbes, descProbeFaults, descColdReads, descMappedFaults} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st, err := c.fetch(ctx)
	if err != nil {
		ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, 1)
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	gauge := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v)
	}
	counter(descFaults, float64(st.Faults))
	counter(descHits, float64(st.Hits))
	counter(descMisses, float64(st.Misses))
	counter(descZero, float64(st.ZeroPages))
	counter(descRemoved, float64(st.RemovedFaults))
	counter(descPopulated, float64(st.PopulatedPages))
	counter(descBackingBytes, float64(st.BackingBytes))
	counter(descBackingSecs, float64(st.BackingNanos)/1e9)
	counter(descEvictions, float64(st.Evictions))
	counter(descSessionsTotal, float64(st.SessionsTotal))
	counter(descPrefetched, float64(st.PrefetchedPages))
	counter(descProbes, float64(st.PrefetchProbes))
	counter(descProbeFaults, float64(st.PrefetchProbeFaults))
	counter(descColdReads, float64(st.ColdReads))
	counter(descMappedFaults, float64(st.MappedFaults))
	for errno, n := range st.CopyErrors {
		counter(descCopyErrors, float64(n), errno)
	}
	gauge(descSessions, float64(st.ActiveSessions))
	gauge(descCacheBytes, float64(st.CacheBytes))
	gauge(descCacheBudget, float64(st.CacheBudgetBytes))
	buckets := map[float64]uint64{}
	for _, b := range st.FaultLatency.Buckets {
		if !b.Inf {
			buckets[b.LeSeconds] = b.Count
		}
	}
	ch <- prometheus.MustNewConstHistogram(descLatency, st.FaultLatency.Count, st.FaultLatency.SumSeconds, buckets)
}
