package pager

import (
	"testing"
	"time"
)

func TestHistogramQuantilesAreBucketBounds(t *testing.T) {
	var c counters
	for range 90 {
		c.observe(3 * time.Microsecond) // bucket le 5 µs
	}
	for range 10 {
		c.observe(700 * time.Microsecond) // bucket le 1 ms
	}
	h := c.snapshot().FaultLatency
	if h.Count != 100 {
		t.Fatalf("count = %d, want 100", h.Count)
	}
	if h.P50Seconds != 5e-6 {
		t.Errorf("p50 = %v, want 5e-06", h.P50Seconds)
	}
	if h.P99Seconds != 1e-3 {
		t.Errorf("p99 = %v, want 0.001", h.P99Seconds)
	}
	if last := h.Buckets[len(h.Buckets)-1]; !last.Inf || last.Count != 100 {
		t.Errorf("last bucket = %+v, want +Inf holding all 100", last)
	}
	var empty counters
	if q := empty.snapshot().FaultLatency.Quantile(0.5); q != 0 {
		t.Errorf("empty p50 = %v, want 0", q)
	}
}

func TestHitRate(t *testing.T) {
	for _, tt := range []struct {
		hits, misses uint64
		want         float64
	}{{0, 0, 0}, {3, 1, 0.75}, {5, 0, 1}} {
		if got := (Counters{Hits: tt.hits, Misses: tt.misses}).HitRate(); got != tt.want {
			t.Errorf("HitRate(%d hits, %d misses) = %v, want %v", tt.hits, tt.misses, got, tt.want)
		}
	}
}
