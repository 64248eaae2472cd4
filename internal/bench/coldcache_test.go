package bench

import (
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/prefetch"
	"github.com/forkd/forkd/internal/testenv"
)

// TestColdBurstKeepsTheVMMProgramCached: what a cold burst drops is the
// snapshot's pages, not the VMM's code: after the page cache is emptied,
// the data dir's staged VMM program is read back in, so a cold burst's disk
// reads are its VMs' (the program was ~22 MiB of a 64 MiB working set's
// ~90 MiB before). The file is dropped from the page cache first
// (FADV_DONTNEED), and the test checks it was, so it can fail.
func TestColdBurstKeepsTheVMMProgramCached(t *testing.T) {
	dir, err := os.MkdirTemp("/var/tmp", "forkd-bench-warm-") // a disk, not tmpfs: its pages can be dropped
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	l, err := guestdir.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	exec := l.StagedExec()
	if err := os.MkdirAll(filepath.Dir(exec), 0o700); err != nil {
		t.Fatal(err)
	}
	prog := make([]byte, 4<<20)
	if _, err := rand.Read(prog); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(exec, prog, 0o500); err != nil {
		t.Fatal(err)
	}
	if err := testenv.EvictPageCache(exec); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(exec)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := prefetch.OpenResidency(f)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Close()
	all := []prefetch.Run{{Page: 0, Pages: uint64(len(prog)) / uint64(os.Getpagesize())}}
	if in, _, err := res.Count(all); err != nil || in != 0 {
		t.Fatalf("%d pages of the program stay cached after FADV_DONTNEED (err %v): cannot tell a warm one", in, err)
	}
	if err := warmVMMProgram(l); err != nil {
		t.Fatal(err)
	}
	if in, total, err := res.Count(all); err != nil || in != total {
		t.Errorf("%d of %d pages of the VMM program cached after the warm-up (err %v), want all", in, total, err)
	}
	unjailed, err := guestdir.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := warmVMMProgram(unjailed); err != nil {
		t.Errorf("no staged program (an unjailed daemon): %v, want nothing to do", err)
	}
}
