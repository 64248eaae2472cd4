package bench

import (
	"testing"
	"time"
)

func ms(v ...int) []time.Duration {
	out := make([]time.Duration, len(v))
	for i, x := range v {
		out[i] = time.Duration(x) * time.Millisecond
	}
	return out
}

func TestSummarizeUsesNearestRankPercentiles(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []time.Duration
		want Summary
	}{
		{"empty", nil, Summary{}},
		{"one", ms(7), Summary{N: 1, Min: ms(7)[0], P50: ms(7)[0], P95: ms(7)[0], Max: ms(7)[0], Mean: ms(7)[0]}},
		// 1..20 unsorted: p50 = 10th value, p95 = 19th value (ceil(0.95*20) = 19).
		{"twenty unsorted", ms(20, 1, 19, 2, 18, 3, 17, 4, 16, 5, 15, 6, 14, 7, 13, 8, 12, 9, 11, 10),
			Summary{N: 20, Min: ms(1)[0], P50: ms(10)[0], P95: ms(19)[0], Max: ms(20)[0], Mean: 10500 * time.Microsecond}},
		// 25 forks: p95 is the 24th (ceil(23.75)); an outlier shows only in max.
		{"25 with an outlier", append(ms(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2), ms(1000)...),
			Summary{N: 25, Min: ms(1)[0], P50: ms(1)[0], P95: ms(2)[0], Max: ms(1000)[0], Mean: 41 * time.Millisecond}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := append([]time.Duration(nil), tc.in...)
			if got := Summarize(tc.in); got != tc.want {
				t.Errorf("Summarize = %+v\nwant        %+v", got, tc.want)
			}
			for i := range in {
				if in[i] != tc.in[i] {
					t.Fatalf("Summarize reordered its input")
				}
			}
		})
	}
}
