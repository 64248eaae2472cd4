package bench

import (
	"testing"
	"time"
)

// pagerJSON is the shape of the pager's GET /stats (internal/pager Stats).
const pagerJSON = `{"version":"0.1.0","pid":4242,"faults":100,"hits":90,"misses":10,"zero_pages":5,"removed_faults":0,
"removes":0,"deferred":0,"populated_pages":0,"backing_bytes":40960,"backing_nanos":1000,"copy_errors":{},
"fault_latency":{"buckets":[{"le_seconds":0.00001,"count":50},{"le_seconds":0.0001,"count":95},{"le_seconds":0,"inf":true,"count":100}],"count":100,"sum_seconds":0.01},
"active_sessions":2,"sessions_total":7,"cache_bytes":8192,"cache_budget_bytes":1073741824,"cache_entries":2,"evictions":0,"draining":false,"sessions":[]}`

func TestParsePagerStats(t *testing.T) {
	got, err := ParsePagerStats([]byte(pagerJSON))
	if err != nil {
		t.Fatal(err)
	}
	if got.Hits != 90 || got.Misses != 10 || got.Faults != 100 || got.ZeroPages != 5 || got.BackingBytes != 40960 ||
		got.BackingNanos != 1000 || got.Pid != 4242 || got.CacheBytes != 8192 || got.FaultLatency.Count != 100 {
		t.Errorf("parsed %+v", got)
	}
	for _, bad := range []string{`{"version":"1"}`, `[1,2]`, `{"hit":1,"misses":2,"faults":3,"backing_bytes":0}`} {
		if _, err := ParsePagerStats([]byte(bad)); err == nil {
			t.Errorf("ParsePagerStats(%s) succeeded; a renamed counter must not read as zero", bad)
		}
	}
}

func TestPagerDeltaAndHitRate(t *testing.T) {
	before := PagerCounters{Hits: 100, Misses: 50, BackingBytes: 1 << 20, Pid: 1, CacheBytes: 10}
	after := PagerCounters{Hits: 199, Misses: 51, BackingBytes: 1<<20 + 4096, Pid: 1, CacheBytes: 20}
	d := after.Sub(before)
	if d.Hits != 99 || d.Misses != 1 || d.BackingBytes != 4096 || d.CacheBytes != 20 || d.Pid != 1 {
		t.Errorf("delta = %+v", d)
	}
	if hr := d.HitRate(); hr != 0.99 {
		t.Errorf("hit rate %v, want 0.99", hr)
	}
	if hr := (PagerCounters{}).HitRate(); hr != 0 {
		t.Errorf("hit rate without lookups = %v, want 0", hr)
	}
}

func TestHistogramDeltaQuantiles(t *testing.T) {
	h := func(c1, c2, inf int64) Histogram {
		return Histogram{Count: inf, Buckets: []Bucket{{LeSeconds: 1e-5, Count: c1}, {LeSeconds: 1e-4, Count: c2}, {Inf: true, Count: inf}}}
	}
	// Before: 100 fast faults. The burst adds 10 fast and 90 slow ones.
	d := h(110, 200, 200).Sub(h(100, 100, 100))
	if d.Count != 100 {
		t.Fatalf("delta count %d", d.Count)
	}
	if q := d.Quantile(0.5); q != 100*time.Microsecond {
		t.Errorf("burst p50 = %v, want 100µs (the burst's own faults, not the history's)", q)
	}
	if q := d.Quantile(0.05); q != 10*time.Microsecond {
		t.Errorf("burst p5 = %v, want 10µs", q)
	}
	if q := h(0, 0, 5).Quantile(0.5); q != 100*time.Microsecond {
		t.Errorf("quantile in +Inf = %v, want the last finite bound", q)
	}
	if (Histogram{}).Quantile(0.5) != 0 {
		t.Error("empty histogram quantile not 0")
	}
	other := Histogram{Count: 1, Buckets: []Bucket{{LeSeconds: 1, Count: 1}}}
	if got := h(1, 1, 1).Sub(other); got.Count != 0 || got.Buckets != nil {
		t.Errorf("delta of histograms with other bounds = %+v, want zero", got)
	}
}
