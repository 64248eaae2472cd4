package bench

import (
	"encoding/json"
	"fmt"
	"time"
)

// PagerCounters are the pager's global counters (GET /pager/stats, the
// pager's GET /stats as is). A burst's figures are the difference of two
// readings.
type PagerCounters struct {
	Hits         int64 `json:"hits"`
	Misses       int64 `json:"misses"`
	Faults       int64 `json:"faults"`
	ZeroPages    int64 `json:"zero_pages"`
	BackingBytes int64 `json:"backing_bytes"`
	BackingNanos int64 `json:"backing_nanos"`
	// ColdReads is faults whose page the pager read from the disk off its
	// session goroutine (absent, so 0, from pagers before it counted them).
	ColdReads int64 `json:"cold_reads"`
	// FaultLatency is the pager's fault service histogram.
	FaultLatency Histogram `json:"fault_latency"`
	// Gauges: the value at the later reading, never subtracted.
	Pid        int   `json:"pid"`
	CacheBytes int64 `json:"cache_bytes"`
}

// Histogram is the pager's cumulative latency histogram.
type Histogram struct {
	Buckets []Bucket `json:"buckets"`
	Count   int64    `json:"count"`
}

// Bucket counts observations ≤ LeSeconds (the last bucket is +Inf).
type Bucket struct {
	LeSeconds float64 `json:"le_seconds"`
	Inf       bool    `json:"inf,omitempty"`
	Count     int64   `json:"count"`
}

// ParsePagerStats reads the pager's stats JSON. An object with none of the
// counters is an error: a renamed field must not read as zero traffic.
func ParsePagerStats(raw json.RawMessage) (PagerCounters, error) {
	var seen map[string]json.RawMessage
	if err := json.Unmarshal(raw, &seen); err != nil {
		return PagerCounters{}, fmt.Errorf("parse pager stats: %w", err)
	}
	var p PagerCounters
	if err := json.Unmarshal(raw, &p); err != nil {
		return PagerCounters{}, fmt.Errorf("parse pager stats: %w", err)
	}
	for _, k := range []string{"hits", "misses", "faults", "backing_bytes"} {
		if _, ok := seen[k]; !ok {
			return PagerCounters{}, fmt.Errorf("parse pager stats: no %q in %.200s", k, raw)
		}
	}
	return p, nil
}

// Sub is p - o for the counters and the histogram; gauges are p's.
func (p PagerCounters) Sub(o PagerCounters) PagerCounters {
	d := p
	d.Hits -= o.Hits
	d.Misses -= o.Misses
	d.Faults -= o.Faults
	d.ZeroPages -= o.ZeroPages
	d.BackingBytes -= o.BackingBytes
	d.BackingNanos -= o.BackingNanos
	d.ColdReads -= o.ColdReads
	d.FaultLatency = p.FaultLatency.Sub(o.FaultLatency)
	return d
}

// HitRate is hits / (hits + misses), 0 without lookups.
func (p PagerCounters) HitRate() float64 {
	return ratio(float64(p.Hits), float64(p.Hits+p.Misses))
}

// Sub subtracts bucket by bucket; histograms with other bounds give the
// zero Histogram.
func (h Histogram) Sub(o Histogram) Histogram {
	if len(o.Buckets) == 0 {
		return h
	}
	if len(h.Buckets) != len(o.Buckets) {
		return Histogram{}
	}
	d := Histogram{Count: h.Count - o.Count, Buckets: make([]Bucket, len(h.Buckets))}
	for i, b := range h.Buckets {
		if b.LeSeconds != o.Buckets[i].LeSeconds || b.Inf != o.Buckets[i].Inf {
			return Histogram{}
		}
		d.Buckets[i] = Bucket{LeSeconds: b.LeSeconds, Inf: b.Inf, Count: b.Count - o.Buckets[i].Count}
	}
	return d
}

// Quantile is the upper bound of the bucket holding the q-quantile (0..1);
// 0 without observations, and the last finite bound when it falls in +Inf.
func (h Histogram) Quantile(q float64) time.Duration {
	if h.Count <= 0 {
		return 0
	}
	rank := int64(q * float64(h.Count))
	last := 0.0
	for _, b := range h.Buckets {
		if b.Inf {
			break
		}
		last = b.LeSeconds
		if b.Count > rank || b.Count == h.Count {
			return time.Duration(b.LeSeconds * float64(time.Second))
		}
	}
	return time.Duration(last * float64(time.Second))
}
