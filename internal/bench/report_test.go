package bench

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
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
	return &Report{
		Config: Config{SizesMiB: []int{256, 4096}, Forks: 25, WorkingSetMiB: 64, Strategies: []string{"hardlink", "copy"},
			Backends: []string{"file", "uffd"}, Temperatures: []string{"cold", "warm"}},
		Cells: []Cell{
			cell(256, "hardlink", "file", "cold", 10*time.Millisecond, 50*time.Millisecond, 100<<20),
			cell(256, "copy", "file", "cold", 400*time.Millisecond, 60*time.Millisecond, 100<<20),
			cell(256, "hardlink", "uffd", "cold", 10*time.Millisecond, 25*time.Millisecond, 300<<20),
			cell(4096, "hardlink", "file", "cold", 11*time.Millisecond, 50*time.Millisecond, 100<<20),
			{SizeMiB: 4096, Strategy: "reflink", Backend: "file", Temperature: "cold", Skipped: "fork strategy not supported"},
		},
		Serial: []SerialFork{
			{SizeMiB: 256, Strategy: "hardlink", Fork: Summary{N: 10, P50: 4 * time.Millisecond}, Floor: Summary{N: 10, P50: time.Millisecond}},
			{SizeMiB: 4096, Strategy: "hardlink", Fork: Summary{N: 10, P50: 5 * time.Millisecond}},
			{SizeMiB: 4096, Strategy: "copy", Fork: Summary{N: 10, P50: 2 * time.Second}},
		},
	}
}

func TestRatiosCompareCellsOfTheRun(t *testing.T) {
	got := map[string]float64{}
	for _, r := range sampleReport().Ratios() {
		got[r.Name] = r.Value
	}
	for name, want := range map[string]float64{
		"256 MiB file cold: copy/hardlink fork p50":                        40,
		"256 MiB hardlink cold: uffd/file PSS":                             3,
		"256 MiB hardlink cold: uffd/file restore p50":                     0.5,
		"hardlink file cold: 4096/256 MiB fork p50":                        1.1,
		"256 MiB serial fork p50 / link+fsync floor p50 (budget 5x)":       4,
		"256 MiB file cold: burst fork p50 / serial fork p50 (budget 3x)":  2.5,
		"4096 MiB file cold: burst fork p50 / serial fork p50 (budget 3x)": 2.2,
	} {
		if v, ok := got[name]; !ok || v < want*0.999 || v > want*1.001 {
			t.Errorf("ratio %q = %v (present %v), want %v; all: %v", name, v, ok, want, got)
		}
	}
}

func TestWriteTableShowsEveryCell(t *testing.T) {
	var b bytes.Buffer
	if err := sampleReport().WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"hardlink", "copy", "skipped reflink/file: fork strategy not supported", "400.0ms", "25/25", "ratios", "copy/hardlink fork p50", "serial forks", "2000.0ms"} {
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
