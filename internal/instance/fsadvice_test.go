package instance

import (
	"os"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/forkd/forkd/internal/testfs"
)

// A data dir that cannot reflink (ext4) is reported at start, with the
// cost and the fix, in Advice (GET /health) and forkd_data_dir_reflink;
// one that can (XFS with reflink) gets no advice.
func TestDataDirThatCannotReflinkIsReported(t *testing.T) {
	pool := testfs.NewPool(512 << 20)
	t.Cleanup(func() {
		if err := pool.Close(); err != nil {
			t.Error(err)
		}
	})
	for _, tc := range []struct {
		kind    testfs.Kind
		reflink bool
	}{{testfs.Ext4, false}, {testfs.XFS, true}} {
		t.Run(string(tc.kind), func(t *testing.T) {
			dir, err := os.MkdirTemp(pool.Get(t, tc.kind).Dir, "fk")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			reg := prometheus.NewRegistry()
			m := newManagerAt(t, dir, func(c *Config) { c.Registerer = reg })
			advice := strings.Join(m.Advice(), " ")
			switch {
			case tc.reflink && advice != "":
				t.Errorf("a data dir on %s gets advice %q; want none", tc.kind, advice)
			case !tc.reflink && (!strings.Contains(advice, "cannot reflink") || !strings.Contains(advice, "reflink=1") ||
				!strings.Contains(advice, "copies its whole RAM")):
				t.Errorf("a data dir on %s: advice %q; want the cost and the fix", tc.kind, advice)
			}
			fams, err := reg.Gather()
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for _, f := range fams {
				if f.GetName() == "forkd_data_dir_reflink" {
					found = true
					want := 0.0
					if tc.reflink {
						want = 1
					}
					if got := f.GetMetric()[0].GetGauge().GetValue(); got != want {
						t.Errorf("forkd_data_dir_reflink on %s = %v, want %v", tc.kind, got, want)
					}
				}
			}
			if !found {
				t.Error("forkd_data_dir_reflink is not registered")
			}
		})
	}
}
