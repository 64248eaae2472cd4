package store

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// The WAL keeps disk reserved beyond its end, so a commit on a full disk
// still finds blocks (see reserveWAL); reopening reserves again.
func TestOpenReservesDiskForTheWAL(t *testing.T) {
	path := filepath.Join(t.TempDir(), "forkd.db")
	for range 2 {
		s, err := Open(context.Background(), path)
		if err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(path + "-wal")
		if err != nil {
			t.Fatalf("no WAL after Open: %v", err)
		}
		if alloc := st.Sys().(*syscall.Stat_t).Blocks * 512; alloc < walReserve {
			t.Fatalf("WAL has %d bytes allocated (size %d), want at least %d reserved", alloc, st.Size(), walReserve)
		}
		s.Close()
	}
}
