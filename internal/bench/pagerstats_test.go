package bench

import "testing"

func TestParsePagerStats(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		want    PagerCounters
		wantErr bool
	}{
		{"top level", `{"hits":90,"misses":10,"faults":100,"zero_pages":5,"backing_bytes":40960,"backing_ns":1000,"sessions":[]}`,
			PagerCounters{Hits: 90, Misses: 10, Faults: 100, ZeroPages: 5, BackingBytes: 40960, BackingNanos: 1000}, false},
		{"global object", `{"global":{"hits":1,"misses":2},"sessions":{"a":{"hits":1}}}`, PagerCounters{Hits: 1, Misses: 2}, false},
		{"nothing known", `{"version":"1"}`, PagerCounters{}, true},
		{"not an object", `[1,2]`, PagerCounters{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParsePagerStats([]byte(tc.in))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tc.wantErr)
			}
			if got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestPagerDeltaAndHitRate(t *testing.T) {
	before := PagerCounters{Hits: 100, Misses: 50, BackingBytes: 1 << 20}
	after := PagerCounters{Hits: 199, Misses: 51, BackingBytes: 1<<20 + 4096}
	d := after.Sub(before)
	if d.Hits != 99 || d.Misses != 1 || d.BackingBytes != 4096 {
		t.Errorf("delta = %+v", d)
	}
	if hr := d.HitRate(); hr != 0.99 {
		t.Errorf("hit rate %v, want 0.99", hr)
	}
	if hr := (PagerCounters{}).HitRate(); hr != 0 {
		t.Errorf("hit rate without lookups = %v, want 0", hr)
	}
}
