package bench

import (
	"encoding/json"
	"fmt"
)

// PagerCounters are the pager's global counters (GET /pager/stats). A
// burst's figures are the difference of two readings.
type PagerCounters struct {
	Hits         int64 `json:"hits"`
	Misses       int64 `json:"misses"`
	Faults       int64 `json:"faults"`
	ZeroPages    int64 `json:"zero_pages"`
	BackingBytes int64 `json:"backing_bytes"`
	BackingNanos int64 `json:"backing_ns"`
}

// pagerKeys are the names each counter may have in the pager's JSON, first
// match wins. The pager's own field names come first.
var pagerKeys = []struct {
	names []string
	field func(*PagerCounters) *int64
}{
	{[]string{"hits", "cache_hits"}, func(p *PagerCounters) *int64 { return &p.Hits }},
	{[]string{"misses", "cache_misses"}, func(p *PagerCounters) *int64 { return &p.Misses }},
	{[]string{"faults", "faults_total"}, func(p *PagerCounters) *int64 { return &p.Faults }},
	{[]string{"zero_pages", "zeropages"}, func(p *PagerCounters) *int64 { return &p.ZeroPages }},
	{[]string{"backing_bytes", "backing_read_bytes"}, func(p *PagerCounters) *int64 { return &p.BackingBytes }},
	{[]string{"backing_ns", "backing_nanos", "backing_nanoseconds", "backing_read_ns"}, func(p *PagerCounters) *int64 { return &p.BackingNanos }},
}

// ParsePagerStats reads the global counters from the pager's stats JSON:
// top-level fields, or those of a "global" object when there is one.
func ParsePagerStats(raw json.RawMessage) (PagerCounters, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(raw, &top); err != nil {
		return PagerCounters{}, fmt.Errorf("parse pager stats: %w", err)
	}
	if g, ok := top["global"]; ok {
		var global map[string]json.RawMessage
		if err := json.Unmarshal(g, &global); err != nil {
			return PagerCounters{}, fmt.Errorf("parse pager stats global: %w", err)
		}
		top = global
	}
	var p PagerCounters
	found := 0
	for _, k := range pagerKeys {
		for _, name := range k.names {
			v, ok := top[name]
			if !ok {
				continue
			}
			if err := json.Unmarshal(v, k.field(&p)); err != nil {
				return PagerCounters{}, fmt.Errorf("parse pager stats %s: %w", name, err)
			}
			found++
			break
		}
	}
	if found == 0 {
		return PagerCounters{}, fmt.Errorf("parse pager stats: no known counter in %.200s", raw)
	}
	return p, nil
}

// Sub is p - o, counter by counter.
func (p PagerCounters) Sub(o PagerCounters) PagerCounters {
	return PagerCounters{
		Hits: p.Hits - o.Hits, Misses: p.Misses - o.Misses, Faults: p.Faults - o.Faults,
		ZeroPages: p.ZeroPages - o.ZeroPages, BackingBytes: p.BackingBytes - o.BackingBytes,
		BackingNanos: p.BackingNanos - o.BackingNanos,
	}
}

// HitRate is hits / (hits + misses), 0 without lookups.
func (p PagerCounters) HitRate() float64 {
	return ratio(float64(p.Hits), float64(p.Hits+p.Misses))
}
