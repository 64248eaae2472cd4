package api

import "testing"

func TestParseBytes(t *testing.T) {
	cases := map[string]int64{"0": 0, "4096": 4096, "1GiB": 1 << 30, "512M": 512 << 20, "64 KiB": 64 << 10, "2gb": 2e9, "1T": 1 << 40}
	for in, want := range cases {
		if got, err := ParseBytes(in); err != nil || got != want {
			t.Errorf("ParseBytes(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "G", "-1", "1.5G", "1Q", "99999999999T"} {
		if _, err := ParseBytes(in); err == nil {
			t.Errorf("ParseBytes(%q) succeeded, want an error", in)
		}
	}
}
