package bench

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"slices"
	"strings"
	"testing"
	"time"
)

func sampleReport() *Report {
	cell := func(size int, strategy, backend, temp string, forkP50, restoreP50 time.Duration, pss int64) Cell {
		return Cell{SizeMiB: size, Strategy: strategy, Backend: backend, Temperature: temp, Forks: 25,
			Fork: Summary{N: 25, P50: forkP50, P95: forkP50 * 2, Max: forkP50 * 3}, Restore: Summary{N: 25, P50: restoreP50},
			Touch: Summary{N: 25, P50: time.Second}, Memory: MemUsage{Pss: pss, Rss: pss * 2},
			MemoryChecks: map[string]int{"ok": 25}, ForkModes: map[string]int{strategy: 25}}
	}
	burst := cell(256, "hardlink", "file", "cold", 10*time.Millisecond, 50*time.Millisecond, 100<<20)
	burst.ForkCPU = &ForkCPU{Daemon: 800 * time.Microsecond, Client: 200 * time.Microsecond}
	return &Report{
		Config: Config{SizesMiB: []int{256, 4096}, Forks: []int{25}, WorkingSetMiB: 64, Strategies: []string{"hardlink", "copy"},
			Backends: []string{"file", "uffd"}, Temperatures: []string{"cold", "warm"}},
		Machine: Machine{CPUs: 2},
		Cells: []Cell{
			burst,
			cell(256, "copy", "file", "cold", 400*time.Millisecond, 60*time.Millisecond, 100<<20),
			cell(256, "hardlink", "uffd", "cold", 10*time.Millisecond, 25*time.Millisecond, 300<<20),
			cell(4096, "hardlink", "file", "cold", 11*time.Millisecond, 50*time.Millisecond, 100<<20),
			{SizeMiB: 4096, Strategy: "reflink", Backend: "file", Temperature: "cold", Skipped: "fork strategy not supported"},
		},
		Serial: []SerialFork{
			{SizeMiB: 256, Strategy: "hardlink", Fork: Summary{N: 10, P50: 4 * time.Millisecond}, Floor: Summary{N: 10, P50: time.Millisecond},
				ForkCPU: &ForkCPU{Daemon: 1500 * time.Microsecond, Client: 300 * time.Microsecond}},
			{SizeMiB: 4096, Strategy: "hardlink", Fork: Summary{N: 10, P50: 5 * time.Millisecond}},
			{SizeMiB: 4096, Strategy: "copy", Fork: Summary{N: 10, P50: 2 * time.Second}},
		},
	}
}

func TestRatiosCompareCellsOfTheRun(t *testing.T) {
	checkRatios(t, sampleReport(), map[string]float64{
		"256 MiB file cold: copy/hardlink fork p50":                        40,
		"256 MiB hardlink cold: uffd/file PSS":                             3,
		"256 MiB hardlink cold: uffd/file restore p50":                     0.5,
		"hardlink file cold: 4096/256 MiB fork p50":                        1.1,
		"256 MiB serial fork p50 / link+fsync floor p50 (budget 5x)":       4,
		"256 MiB file cold: burst fork p50 / serial fork p50 (budget 3x)":  2.5,
		"4096 MiB file cold: burst fork p50 / serial fork p50 (budget 3x)": 2.2,
		// 13 of 25 forks at 1 ms of CPU each, over 2 CPUs: 6.5 ms against 4.
		"256 MiB file cold: burst p50 CPU floor (half its forks' CPU / 2 CPUs) / serial fork p50": 6.5 / 4.0,
	})
}

func TestWriteTableShowsEveryCell(t *testing.T) {
	var b bytes.Buffer
	if err := sampleReport().WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"hardlink", "copy", "skipped reflink/file: fork strategy not supported", "400.0ms", "25/25", "ratios", "copy/hardlink fork p50", "serial forks", "2000.0ms",
		"800µs+200µs", "1.5ms+300µs"} { // the burst's and the serial forks' CPU per fork
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

func TestWriteJSONRoundTrips(t *testing.T) {
	var b bytes.Buffer
	rep := sampleReport()
	if err := rep.WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(b.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if len(back.Cells) != len(rep.Cells) || back.Cells[1].Fork.P50 != 400*time.Millisecond || back.Cells[0].Memory.Pss != 100<<20 {
		t.Errorf("JSON round trip lost data: %+v", back.Cells)
	}
	if !strings.Contains(b.String(), `"p50_ns"`) || !strings.Contains(b.String(), `"pss_bytes"`) {
		t.Errorf("JSON lacks the documented keys:\n%s", b.String())
	}
}

func TestWriteSVGDrawsEveryRunCell(t *testing.T) {
	var b bytes.Buffer
	if err := sampleReport().WriteSVG(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	if !strings.HasPrefix(out, "<svg") || !strings.HasSuffix(strings.TrimSpace(out), "</svg>") {
		t.Fatalf("not an SVG document:\n%.300s", out)
	}
	for _, want := range []string{"256 MiB copy file cold", "4096 MiB hardlink file cold", "400.0ms / 800.0ms", "100.0M"} {
		if !strings.Contains(out, want) {
			t.Errorf("SVG lacks %q", want)
		}
	}
	if strings.Contains(out, "reflink") {
		t.Errorf("SVG draws a skipped cell")
	}
	var doc struct{}
	if err := xml.Unmarshal(b.Bytes(), &doc); err != nil {
		t.Errorf("SVG is not well-formed XML: %v", err)
	}
}

// prefetchReport is a run with prefetch off and auto, unpaced, 25 forks,
// and three differing-workload runs.
func prefetchReport() *Report {
	cell := func(pf, backend, temp string, toWS time.Duration, disk int64, wasted uint64) Cell {
		c := Cell{SizeMiB: 1024, Strategy: "hardlink", Prefetch: pf, Rate: -1, Forks: 25, Backend: backend, Temperature: temp,
			Workload: WorkloadSame, ToWorkingSet: Summary{N: 25, P50: toWS}, DiskReadBytes: disk,
			Pager: &PagerCounters{Faults: 1000}, MemoryChecks: map[string]int{"ok": 25}}
		if pf == PrefetchAuto {
			c.PrefetchStats = &PrefetchSum{Modes: map[string]int{"replay": 25}, PagesRecorded: 25 * 16400, PagesPrefetched: 1000, PagesWasted: wasted}
		}
		return c
	}
	differs := func(pf, backend string, run int, toWS time.Duration) Cell {
		c := cell(pf, backend, Cold, toWS, 0, 0)
		c.Workload, c.Run = WorkloadDiffers, run
		return c
	}
	uffdWarm := cell("auto", "uffd", "warm", 1800*time.Millisecond, 0, 10)
	uffdWarm.PagerCPU = 30 * time.Millisecond
	return &Report{
		Config: Config{SizesMiB: []int{1024}, Forks: []int{25}, Rates: []int{-1}, WorkingSetMiB: 64, Strategies: []string{"hardlink"},
			Backends: []string{"file", "uffd"}, Temperatures: []string{"cold", "warm"}, Prefetch: []string{"off", "auto"}, DiffersRuns: 3},
		Machine: Machine{CPUs: 2},
		Cells: []Cell{
			cell("off", "file", "cold", 4*time.Second, 200<<20, 0),
			cell("off", "file", "warm", 3*time.Second, 0, 0),
			cell("off", "uffd", "cold", 16*time.Second, 70<<20, 0),
			cell("off", "uffd", "warm", 12*time.Second, 0, 0),
			cell("auto", "file", "cold", 2*time.Second, 72<<20, 50),
			cell("auto", "file", "warm", 1500*time.Millisecond, 0, 20),
			cell("auto", "uffd", "cold", 2200*time.Millisecond, 70<<20, 30),
			uffdWarm,
			differs("off", "file", 1, 4*time.Second), differs("auto", "file", 1, 4400*time.Millisecond),
			differs("off", "file", 2, 4*time.Second), differs("auto", "file", 2, 4*time.Second),
			differs("off", "file", 3, 4*time.Second), differs("auto", "file", 3, 5*time.Second),
		},
	}
}

func TestPrefetchRatiosAreTheBudgets(t *testing.T) {
	pre := "1024 MiB rate -1, 25 forks: "
	checkRatios(t, prefetchReport(), map[string]float64{
		pre + "prefetch auto cold: uffd/file to-ws p50": 1.1,
		pre + "prefetch auto warm: uffd/file to-ws p50": 1.2,
		pre + "prefetch off cold: uffd/file to-ws p50":  4,
		// 25 forks' 30 ms of pager CPU on 2 CPUs, after File's 1.5 s.
		pre + "prefetch auto warm: uffd/file to-ws floor from the pager's CPU (file to-ws p50 + 25 forks' pager CPU / 2 CPUs, over file to-ws p50)": (1500 + 375) / 1500.0,
		pre + "prefetch auto file: cold/warm to-ws p50":                             2.0 / 1.5,
		pre + "prefetch auto file cold: disk read/working set":                      72.0 / 64,
		pre + "uffd cold: prefetch auto/off to-ws p50":                              2.2 / 16,
		pre + "file cold prefetch auto: waste (wasted/prefetched)":                  0.05,
		"1024 MiB differing workload file cold, run 1: prefetch auto/off to-ws p50": 1.1,
		"1024 MiB differing workload file cold: median of 3 runs":                   1.1,
		"1024 MiB differing workload file cold: spread (max-min) of 3 runs":         0.25,
	})
}

func TestWriteTableShowsThePrefetchRows(t *testing.T) {
	var b bytes.Buffer
	if err := prefetchReport().WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"prefetch (to ws", "differs#2", "5.0%", "replay"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
}

// buildsReport compares two builds, prefetch off: each daemon timed its
// own serial forks beside its own floor samples.
func buildsReport() *Report {
	cell := func(pf string, forkP50 time.Duration) Cell {
		return Cell{SizeMiB: 256, Strategy: "hardlink", Prefetch: pf, Rate: 20000, Forks: 25, Backend: "file", Temperature: "warm",
			Workload: WorkloadSame, Fork: Summary{N: 25, P50: forkP50}, MemoryChecks: map[string]int{"ok": 25}}
	}
	serial := func(build string, p50, floor time.Duration) SerialFork {
		return SerialFork{SizeMiB: 256, Strategy: "hardlink", Prefetch: "off@" + build, Build: build,
			Fork: Summary{N: 20, P50: p50}, Floor: Summary{N: 20, P50: floor}}
	}
	return &Report{
		Config: Config{SizesMiB: []int{256}, Forks: []int{25}, Rates: []int{20000}, Strategies: []string{"hardlink"},
			Backends: []string{"file"}, Temperatures: []string{"warm"}, Prefetch: []string{"off@before", "off@after"}, Builds: []string{"before", "after"}},
		Cells: []Cell{cell("off@before", 20*time.Millisecond), cell("off@after", 15*time.Millisecond)},
		Serial: []SerialFork{
			serial("before", 2*time.Millisecond, 500*time.Microsecond),
			serial("after", time.Millisecond, 400*time.Microsecond),
		},
	}
}

func TestRatiosCompareEachBuildsSerialForks(t *testing.T) {
	got := checkRatios(t, buildsReport(), map[string]float64{
		"256 MiB off@before: serial fork p50 / link+fsync floor p50 (budget 5x)":     4,
		"256 MiB off@after: serial fork p50 / link+fsync floor p50 (budget 5x)":      2.5,
		"256 MiB off@before file warm: burst fork p50 / serial fork p50 (budget 3x)": 10,
		"256 MiB off@after file warm: burst fork p50 / serial fork p50 (budget 3x)":  15,
		"256 MiB hardlink prefetch off: serial fork p50 after/before":                0.5,
	})
	if _, ok := got["256 MiB hardlink prefetch off: serial fork p50 before/before"]; ok {
		t.Errorf("the first build is compared with itself")
	}
	if t.Failed() {
		t.Logf("all ratios: %v", got)
	}
}

func TestSerialTableNamesEachBinary(t *testing.T) {
	var b bytes.Buffer
	if err := buildsReport().WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	_, serial, ok := strings.Cut(out, "serial forks")
	if !ok {
		t.Fatalf("no serial table:\n%s", out)
	}
	serial, _, _ = strings.Cut(serial, "ratios")
	rows := map[string]string{}
	for _, line := range strings.Split(serial, "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[0] == "256" {
			rows[f[3]] = line
		}
	}
	for build, want := range map[string][]string{
		"before": {"2.0ms", "500µs", "4.00x", "1.00x"},
		"after":  {"1.0ms", "400µs", "2.50x", "0.50x"},
	} {
		row, ok := rows[build]
		if !ok {
			t.Errorf("no serial row names binary %q:\n%s", build, serial)
			continue
		}
		for _, w := range want {
			if !strings.Contains(row, w) {
				t.Errorf("serial row of %q lacks %q: %q", build, w, row)
			}
		}
	}
	if !strings.Contains(serial, "p50/before") {
		t.Errorf("serial table lacks the p50/before column:\n%s", serial)
	}
}

// TestSerialTableWithOneDaemon keeps the one-daemon table as it was: no
// comparison column, the p50/floor ratio per row.
func TestSerialTableWithOneDaemon(t *testing.T) {
	var b bytes.Buffer
	if err := sampleReport().WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	_, serial, _ := strings.Cut(b.String(), "serial forks")
	serial, _, _ = strings.Cut(serial, "ratios")
	if !strings.Contains(serial, "4.00x") || strings.Count(serial, "p50/") != strings.Count(serial, "p50/floor") {
		t.Errorf("one-daemon serial table: want the 4.00x p50/floor and no build column:\n%s", serial)
	}
}

func TestAlternateTakesTurns(t *testing.T) {
	for _, tc := range []struct {
		name     string
		k, n, r  int
		failAt   map[int]int // series -> the step (from 1) that fails
		want     []int
		wantMade []int
	}{
		{name: "one series", k: 1, n: 3, r: 2, want: []int{0, 0, 0}, wantMade: []int{3}},
		{name: "rounds of two", k: 2, n: 3, r: 2, want: []int{0, 0, 1, 1, 0, 1}, wantMade: []int{3, 3}},
		{name: "three series", k: 3, n: 2, r: 1, want: []int{0, 1, 2, 0, 1, 2}, wantMade: []int{2, 2, 2}},
		{name: "a failing series stops alone", k: 2, n: 3, r: 2, failAt: map[int]int{0: 2}, want: []int{0, 0, 1, 1, 1}, wantMade: []int{1, 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var order []int
			made, tries := make([]int, tc.k), make([]int, tc.k)
			alternate(tc.k, tc.n, tc.r, func(i int) bool {
				order = append(order, i)
				tries[i]++
				if tries[i] == tc.failAt[i] {
					return false
				}
				made[i]++
				return true
			})
			if !slices.Equal(order, tc.want) || !slices.Equal(made, tc.wantMade) {
				t.Errorf("order %v, made %v; want %v, %v", order, made, tc.want, tc.wantMade)
			}
		})
	}
}

// checkRatios requires each ratio of want among rep's, to 0.1%, and
// returns them all by name (logged when the test fails).
func checkRatios(t *testing.T, rep *Report, want map[string]float64) map[string]float64 {
	t.Helper()
	got := map[string]float64{}
	for _, r := range rep.Ratios() {
		got[r.Name] = r.Value
	}
	for name, w := range want {
		if v, ok := got[name]; !ok || v < w*0.999 || v > w*1.001 {
			t.Errorf("ratio %q = %v (present %v), want %v", name, v, ok, w)
		}
	}
	if t.Failed() {
		t.Logf("all ratios: %v", got)
	}
	return got
}

// roundsReport is a run of three rounds of 1-fork bursts, File and Uffd
// warm, prefetch auto: round 2 ran on a slower machine than the others.
func roundsReport() *Report {
	cell := func(backend string, round int, toWS time.Duration) Cell {
		return Cell{SizeMiB: 256, Strategy: "hardlink", Prefetch: PrefetchAuto, Rate: -1, Forks: 1, Backend: backend, Temperature: Warm,
			Workload: WorkloadSame, Run: round, ToWorkingSet: Summary{N: 1, P50: toWS}, Restore: Summary{N: 1, P50: toWS / 4}, MemoryChecks: map[string]int{"ok": 1},
			Samples: &Samples{ToWorkingSet: []time.Duration{toWS}}}
	}
	ms := time.Millisecond
	return &Report{
		Config: Config{SizesMiB: []int{256}, Forks: []int{1}, Rates: []int{-1}, WorkingSetMiB: 64, Strategies: []string{"hardlink"},
			Backends: []string{"file", "uffd"}, Temperatures: []string{"warm"}, Prefetch: []string{"auto"}, Rounds: 3},
		Cells: []Cell{
			cell("file", 1, 100*ms), cell("uffd", 1, 120*ms),
			cell("file", 2, 200*ms), cell("uffd", 2, 210*ms),
			cell("file", 3, 100*ms), cell("uffd", 3, 150*ms),
		},
	}
}

// Each round's ratio pairs the cells of that round: 1.2, 1.05 and 1.5,
// median 1.2. Ratios of the first round alone (1.2) or of the pooled p50s
// (150/100 = 1.5) would each pass for one of them, the spread for neither.
// The prefetch budgets and the other ratios of cells (restore p50 here, a
// quarter of to-ws in each cell) alike.
func TestRoundsQuoteTheMedianOfEachRoundsRatio(t *testing.T) {
	for _, pre := range []string{"256 MiB rate -1, 1 forks: prefetch auto warm: uffd/file to-ws p50", "256 MiB hardlink warm: uffd/file restore p50"} {
		got := checkRatios(t, roundsReport(), map[string]float64{
			pre + ", median of 3 rounds":           1.2,
			pre + ", spread (max-min) of 3 rounds": 0.45,
		})
		if v, ok := got[pre]; ok {
			t.Errorf("with rounds the one-round ratio %q = %v is quoted too", pre, v)
		}
	}
}

func TestWriteTableShowsEachRound(t *testing.T) {
	var b bytes.Buffer
	if err := roundsReport().WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"same#2", "to ws by round", "120.0ms 210.0ms 150.0ms  150.0ms", "100.0ms 200.0ms 100.0ms  100.0ms"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

// With Config.Batch, a burst's batch call is compared with the serial fork
// as the burst is, and printed beside the concurrent calls.
func TestBatchCallIsABudgetRatio(t *testing.T) {
	rep := sampleReport()
	rep.Config.Batch = true
	calls := []time.Duration{9 * time.Millisecond, 5 * time.Millisecond, 6 * time.Millisecond}
	rep.Cells[0].Batch = &BatchFork{Call: Summarize(calls).P50, Calls: calls, CPU: &ForkCPU{Daemon: 300 * time.Microsecond, Client: 10 * time.Microsecond}}
	rep.Cells[3].Batch = &BatchFork{Err: "404 not_found: no such endpoint"}
	checkRatios(t, rep, map[string]float64{
		"256 MiB file cold: one batch call of the burst's forks, p50 / serial fork p50 (budget 3x)": 6.0 / 4.0,
		"256 MiB file cold: burst fork p50 / serial fork p50 (budget 3x)":                           2.5,
	})
	for _, r := range rep.Ratios() {
		if strings.HasPrefix(r.Name, "4096 MiB") && strings.Contains(r.Name, "batch") {
			t.Errorf("a failed batch call gave a ratio: %+v", r)
		}
	}
	var b bytes.Buffer
	if err := rep.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"batch call p50", "calls", "6.0ms", "5.0ms", "9.0ms", "300µs+10µs", "404 not_found"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
}

// A cold burst is set against cold serial forks, like for like, beside the
// warm serial fork it was always set against; the serial fork's floor budget
// is the warm row's alone, and warm bursts get no cold ratio.
func TestColdBurstsAreSetAgainstColdSerialForks(t *testing.T) {
	rep := sampleReport()
	rep.Config.Batch = true
	rep.Cells[0].Batch = &BatchFork{Call: 6 * time.Millisecond, Calls: []time.Duration{6 * time.Millisecond}}
	warm := rep.Cells[0]
	warm.Temperature, warm.Fork.P50 = Warm, 7*time.Millisecond
	rep.Cells = append(rep.Cells, warm)
	rep.Serial = append(rep.Serial, SerialFork{SizeMiB: 256, Strategy: "hardlink", Temperature: Cold,
		Fork: Summary{N: 10, P50: 8 * time.Millisecond}, Floor: Summary{N: 10, P50: 2 * time.Millisecond}})
	got := checkRatios(t, rep, map[string]float64{
		"256 MiB file cold: burst fork p50 / cold serial fork p50 (like for like)":                           10.0 / 8,
		"256 MiB file cold: one batch call of the burst's forks, p50 / cold serial fork p50 (like for like)": 6.0 / 8,
		"256 MiB file cold: one batch call of the burst's forks, p50 / serial fork p50 (budget 3x)":          6.0 / 4,
		"256 MiB serial fork p50 / link+fsync floor p50 (budget 5x)":                                         4.0,
		"256 MiB file warm: burst fork p50 / serial fork p50 (budget 3x)":                                    7.0 / 4,
	})
	for name := range got {
		if strings.Contains(name, "warm") && strings.Contains(name, "cold serial") {
			t.Errorf("a warm burst was set against the cold serial forks: %q", name)
		}
	}
	var b bytes.Buffer
	if err := rep.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	coldRow := false
	for _, line := range strings.Split(b.String(), "\n") {
		f := strings.Fields(line)
		coldRow = coldRow || len(f) > 6 && f[4] == Cold && f[6] == "8.0ms"
	}
	if !strings.Contains(b.String(), "temp cold: each fork right after the caches were dropped") || !coldRow {
		t.Errorf("the serial table does not show the cold row as cold:\n%s", b.String())
	}
}
