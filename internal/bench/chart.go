package bench

import (
	"fmt"
	"html"
	"io"
	"strings"
	"time"
)

// WriteSVG draws the report as one SVG page: per cell, fork, restore and
// touch latency (bar at p50, whisker to p95), then the summed PSS of the
// fork VMMs. SVG, not PNG: it needs no plotting dependency and any browser
// shows it.
func (r *Report) WriteSVG(w io.Writer) error {
	var cells []Cell
	for _, c := range r.Cells {
		if c.Skipped == "" && c.Forks > c.Failed {
			cells = append(cells, c)
		}
	}
	const (
		labelW = 260 // cell labels
		plotW  = 560
		rowH   = 18
		gap    = 10
		top    = 40
	)
	series := []struct {
		name  string
		color string
		get   func(Cell) Summary
	}{
		{"fork (API, to Standby)", "#4c78a8", func(c Cell) Summary { return c.Fork }},
		{"restore (to Running)", "#f58518", func(c Cell) Summary { return c.Restore }},
		{"touch (working set read)", "#54a24b", func(c Cell) Summary { return c.Touch }},
	}
	var maxLat time.Duration
	var maxPSS int64
	for _, c := range cells {
		for _, s := range series {
			maxLat = max(maxLat, s.get(c).P95)
		}
		maxPSS = max(maxPSS, c.Memory.Pss)
	}
	groupH := len(series)*rowH + gap
	latH := top + len(cells)*groupH + 30
	pssTop := latH + 40
	height := pssTop + top + len(cells)*(rowH+4) + 30
	width := labelW + plotW + 200

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="10" y="20" font-size="15" font-weight="bold">fork-burst: %d forks/burst, working set %d MiB, %s (%s), %d CPUs — latency p50 (bar) to p95 (whisker)</text>`+"\n",
		r.Config.maxForks(), r.Config.WorkingSetMiB, html.EscapeString(r.Machine.Device), html.EscapeString(r.Machine.FSType), r.Machine.CPUs)
	for i, s := range series {
		x := labelW + i*190
		fmt.Fprintf(&b, `<rect x="%d" y="28" width="10" height="10" fill="%s"/><text x="%d" y="37">%s</text>`+"\n", x, s.color, x+14, s.name)
	}
	scale := func(d time.Duration) float64 {
		if maxLat == 0 {
			return 0
		}
		return float64(d) / float64(maxLat) * plotW
	}
	y := top + 10
	for _, c := range cells {
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", labelW-8, y+rowH+4, html.EscapeString(cellLabel(c)))
		for _, s := range series {
			sum := s.get(c)
			x50, x95 := scale(sum.P50), scale(sum.P95)
			fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>`, labelW, y+2, x50, rowH-4, s.color)
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="black"/>`, float64(labelW)+x50, y+rowH/2, float64(labelW)+x95, y+rowH/2)
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="black"/>`, float64(labelW)+x95, y+4, float64(labelW)+x95, y+rowH-4)
			fmt.Fprintf(&b, `<text x="%.1f" y="%d" fill="#333">%s / %s</text>`+"\n", float64(labelW)+x95+6, y+rowH-5, durStr(sum.P50), durStr(sum.P95))
			y += rowH
		}
		y += gap
	}
	fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#999"/>`+"\n", labelW, top+10, labelW, y)

	fmt.Fprintf(&b, `<text x="10" y="%d" font-size="15" font-weight="bold">PSS of the %d fork VMMs together (density: File shares clean pages, Uffd copies them)</text>`+"\n", pssTop, r.Config.maxForks())
	y = pssTop + 20
	for _, c := range cells {
		wd := 0.0
		if maxPSS > 0 {
			wd = float64(c.Memory.Pss) / float64(maxPSS) * plotW
		}
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%s</text>`, labelW-8, y+rowH-5, html.EscapeString(cellLabel(c)))
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="#b279a2"/>`, labelW, y+2, wd, rowH-4)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d">%s</text>`+"\n", float64(labelW)+wd+6, y+rowH-5, bytesStr(c.Memory.Pss))
		y += rowH + 4
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

func cellLabel(c Cell) string {
	return fmt.Sprintf("%d MiB %s %s %s", c.SizeMiB, c.Strategy, c.Backend, c.Temperature)
}
