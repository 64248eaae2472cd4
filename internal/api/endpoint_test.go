package api_test

import (
	"os"
	"testing"

	"github.com/forkd/forkd/internal/api"
)

func TestResolveHostPrecedence(t *testing.T) {
	env := func(m map[string]string) func(string) (string, bool) {
		return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
	}
	cases := []struct {
		name, flag string
		env        map[string]string
		want       string
	}{
		{"flag wins", "tcp://127.0.0.1:9", map[string]string{"FORKD_HOST": "/e.sock", "FORKD_DATA": "/d"}, "tcp://127.0.0.1:9"},
		{"then FORKD_HOST", "", map[string]string{"FORKD_HOST": "/e.sock", "FORKD_DATA": "/d"}, "/e.sock"},
		{"then FORKD_DATA's socket", "", map[string]string{"FORKD_DATA": "/d"}, "/d/forkd.sock"},
	}
	for _, tc := range cases {
		if got := api.ResolveHost(tc.flag, env(tc.env)); got != tc.want {
			t.Errorf("%s: ResolveHost = %q, want %q", tc.name, got, tc.want)
		}
	}
	def := api.ResolveHost("", env(nil))
	if os.Geteuid() == 0 && def != "/var/lib/forkd/forkd.sock" {
		t.Errorf("root's default host is %q, want /var/lib/forkd/forkd.sock", def)
	}
}
