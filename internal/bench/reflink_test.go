package bench

import (
	"testing"

	"github.com/forkd/forkd/internal/testfs"
)

// The reflink strategy is skipped, not failed fork by fork, where the
// filesystem cannot reflink; and it runs where it can.
func TestCanReflinkTellsFilesystemsApart(t *testing.T) {
	for _, kind := range []testfs.Kind{testfs.Ext4, testfs.XFS} {
		t.Run(string(kind), func(t *testing.T) {
			fs := testfs.Mount(t, kind, 512<<20)
			err := canReflink(fs.Dir)
			if got := err == nil; got != kind.Reflink() {
				t.Fatalf("canReflink on %s: err = %v, want reflink = %v", kind, err, kind.Reflink())
			}
		})
	}
}
