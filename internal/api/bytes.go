package api

import (
	"fmt"
	"strconv"
	"strings"
)

// ParseBytes parses a byte count: a plain integer, or one with a K, M, G, T
// (powers of 1024, also written KiB, MiB...) or KB, MB, GB, TB (powers of
// 1000) suffix.
func ParseBytes(s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := len(t)
	for i > 0 && (t[i-1] < '0' || t[i-1] > '9') {
		i--
	}
	num, unit := t[:i], strings.ToUpper(strings.TrimSpace(t[i:]))
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("byte count %q: %w", s, err)
	}
	var mult int64
	switch unit {
	case "", "B":
		mult = 1
	case "K", "KIB":
		mult = 1 << 10
	case "M", "MIB":
		mult = 1 << 20
	case "G", "GIB":
		mult = 1 << 30
	case "T", "TIB":
		mult = 1 << 40
	case "KB":
		mult = 1e3
	case "MB":
		mult = 1e6
	case "GB":
		mult = 1e9
	case "TB":
		mult = 1e12
	default:
		return 0, fmt.Errorf("byte count %q: unknown unit %q", s, unit)
	}
	if n < 0 || (n > 0 && mult > (1<<63-1)/n) {
		return 0, fmt.Errorf("byte count %q: out of range", s)
	}
	return n * mult, nil
}
