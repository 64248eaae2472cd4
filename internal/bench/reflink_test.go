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
			if why := testfs.Unavailable(kind); why != "" {
				t.Skip("SKIP (not run): " + why)
			}
			fs, err := testfs.Mount(kind, 512<<20)
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := fs.Close(); err != nil {
					t.Error(err)
				}
			}()
			err = canReflink(fs.Dir)
			if got := err == nil; got != kind.Reflink() {
				t.Fatalf("canReflink on %s: err = %v, want reflink = %v", kind, err, kind.Reflink())
			}
		})
	}
}
