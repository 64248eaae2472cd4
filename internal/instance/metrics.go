package instance

import (
	"context"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/memfile"
	"github.com/forkd/forkd/internal/pager"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the manager's Prometheus series.
type metrics struct {
	opDuration     *prometheus.HistogramVec
	shareFallbacks *prometheus.CounterVec
	fullCopies     prometheus.Counter
	// capacityRefusals counts requests the host could not hold.
	capacityRefusals *prometheus.CounterVec
	states           *stateCollector
	pager            prometheus.Collector // the pager's stats, re-exported
	groups, units    prometheus.CounterFunc
	imageBuilds      *prometheus.HistogramVec
	images           prometheus.Collector

	prefetchRestores   *prometheus.CounterVec
	prefetchPages      *prometheus.CounterVec
	prefetchWorkingSet *prometheus.HistogramVec
	reflink            prometheus.Collector // forkd_data_dir_reflink
	forkTrees          prometheus.GaugeFunc // forkd_fork_trees_ready
}

func newMetrics(m *Manager) *metrics {
	return &metrics{
		reflink: m.reflinkGauge(),
		forkTrees: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "forkd_fork_trees_ready",
			Help: "Empty fork trees made ahead and ready for forks to take (fork_tree_pool).",
		}, func() float64 { return float64(m.forkTreesReady()) }),
		opDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "forkd_instance_operation_duration_seconds",
			Help:    "Duration of instance operations (create, start, standby, restore, fork, snapshot, ...).",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}, []string{"op"}),
		shareFallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "forkd_memfile_share_fallbacks_total",
			Help: "Mem-file shares that could not hardlink and fell back to reflink or copy, by errno.",
		}, []string{"reason"}),
		fullCopies: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "forkd_memfile_full_copies_total",
			Help: "Copies (clones, unshares) that moved every byte because the filesystem cannot report holes.",
		}),
		capacityRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "forkd_capacity_refusals_total",
			Help: "Requests refused with insufficient_resources, by operation and resource (memory, vcpus, running VMs, disk).",
		}, []string{"op", "resource"}),
		states: &stateCollector{m: m, desc: prometheus.NewDesc("forkd_instances",
			"Instances by state.", []string{"state"}, nil)},
		pager: pager.NewCollector(m.pagerStatsForMetrics),
		groups: prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "forkd_store_group_commits_total",
			Help: "Store group commits (one transaction and one fsync each).",
		}, func() float64 { g, _ := m.db.GroupCommits(); return float64(g) }),
		imageBuilds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "forkd_image_build_duration_seconds",
			Help:    "Duration of image builds (download, verify, unpack, mkfs), by outcome (ok or failed).",
			Buckets: prometheus.ExponentialBuckets(0.1, 2, 14),
		}, []string{"outcome"}),
		images: &imageCollector{m: m,
			count: prometheus.NewDesc("forkd_images", "Images stored.", nil, nil),
			bytes: prometheus.NewDesc("forkd_image_disk_bytes", "Bytes the stored images' root filesystems allocate.", nil, nil)},
		units: prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "forkd_store_group_commit_units_total",
			Help: "Units of writes committed by store group commits; units/commits is the mean group size.",
		}, func() float64 { _, u := m.db.GroupCommits(); return float64(u) }),
		prefetchRestores: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "forkd_prefetch_restores_total",
			Help: "Restores by what they did with their cache key's working set: record, replay or none (another restore was recording it, or it could not be used).",
		}, []string{"backend", "mode"}),
		prefetchPages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "forkd_prefetch_pages_total",
			Help: "Working-set pages recorded, prefetched by replay, and prefetched but not used within the prefetch window (wasted).",
		}, []string{"backend", "kind"}),
		prefetchWorkingSet: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "forkd_prefetch_working_set_seconds",
			Help:    "Replay: from the restore call until the recorded working set was in memory.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 14),
		}, []string{"backend"}),
	}
}

// observePrefetch counts one restore's finished prefetch.
func (x *metrics) observePrefetch(backend string, p *api.Prefetch) {
	if p == nil {
		return
	}
	x.prefetchRestores.WithLabelValues(backend, p.Mode).Inc()
	x.prefetchPages.WithLabelValues(backend, "recorded").Add(float64(boolU64(p.Mode == "record") * p.PagesRecorded))
	x.prefetchPages.WithLabelValues(backend, "prefetched").Add(float64(p.PagesPrefetched))
	x.prefetchPages.WithLabelValues(backend, "wasted").Add(float64(p.PagesWasted))
	if p.WorkingSetMs > 0 {
		x.prefetchWorkingSet.WithLabelValues(backend).Observe(float64(p.WorkingSetMs) / 1000)
	}
}

func boolU64(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

func (x *metrics) register(r prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{x.opDuration, x.shareFallbacks, x.fullCopies, x.capacityRefusals, x.states, x.pager, x.groups, x.units, x.imageBuilds, x.images,
		x.prefetchRestores, x.prefetchPages, x.prefetchWorkingSet, x.reflink, x.forkTrees} {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// countFallback logs and counts a mem-file share that did not hardlink
// (invariant 1 of docs/architecture.md §3: a warning and a metric labelled
// with the errno).
func (m *Manager) countFallback(res memfile.ShareResult, op, subject string) {
	if res.Reason == "" {
		return
	}
	m.met.shareFallbacks.WithLabelValues(res.Reason).Inc()
	m.log.Warn("mem-file share fell back from hardlink", "op", op, "instance", subject, "mode", res.Mode, "errno", res.Reason)
}

// noteFullCopy logs and counts a copy that could not stay sparse: the data
// dir's filesystem cannot report holes, so every byte of path was moved
// (memfile.Options.FullCopy).
func (m *Manager) noteFullCopy(path string, bytes int64) {
	m.met.fullCopies.Inc()
	m.log.Warn("filesystem cannot report holes: a sparse copy moved every byte", "path", path, "bytes", bytes)
}

// noteImageBuild observes one image build (image.Config.BuildDone).
func (m *Manager) noteImageBuild(d time.Duration, err error) {
	outcome := "ok"
	if err != nil {
		outcome = "failed"
	}
	m.met.imageBuilds.WithLabelValues(outcome).Observe(d.Seconds())
}

// imageCollector reads the image count and disk use from the store at
// scrape time.
type imageCollector struct {
	m            *Manager
	count, bytes *prometheus.Desc
}

func (c *imageCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.count; ch <- c.bytes }

func (c *imageCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	list, err := c.m.db.ListImages(ctx)
	if err != nil {
		return
	}
	var bytes int64
	for _, im := range list {
		bytes += im.DiskBytes
	}
	ch <- prometheus.MustNewConstMetric(c.count, prometheus.GaugeValue, float64(len(list)))
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, float64(bytes))
}

// stateCollector reads instance counts from the store at scrape time.
type stateCollector struct {
	m    *Manager
	desc *prometheus.Desc
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	counts, err := c.m.db.CountInstancesByState(ctx)
	if err != nil {
		return
	}
	for st, n := range counts {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n), st)
	}
}
