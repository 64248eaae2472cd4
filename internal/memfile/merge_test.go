package memfile

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/forkd/forkd/internal/testfs"
)

const mergeSize = 8 << 20

// mergeFixture writes a dense base of random bytes and a sparse diff whose
// data extents include a page the guest zeroed, and returns the bytes the
// base must hold after the merge.
func mergeFixture(t *testing.T, base, diff string) (want []byte) {
	t.Helper()
	baseBytes := randBytes(t, mergeSize)
	writeSparse(t, base, mergeSize, extent{0, baseBytes})
	exts := []extent{
		{0, randBytes(t, page)},
		{1 << 20, fill(page, 0)}, // dirtied to zeros: must overwrite the base page
		{5 << 20, randBytes(t, 3*page)},
		{mergeSize - page, randBytes(t, page)},
	}
	writeSparse(t, diff, mergeSize, exts...)
	want = bytes.Clone(baseBytes)
	for _, e := range exts {
		copy(want[e.off:], e.data)
	}
	return want
}

func sumBytes(b []byte) string { h := sha256.Sum256(b); return hex.EncodeToString(h[:]) }

func TestMergeDiffWritesEveryDataExtentIncludingZeroPages(t *testing.T) {
	onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
		base, diff := filepath.Join(dir, "memory"), filepath.Join(dir, "diff")
		want := mergeFixture(t, base, diff)
		ino, diffSum := stat(t, base).Ino, sum(t, diff)
		if err := MergeDiff(base, diff); err != nil {
			t.Fatal(err)
		}
		if got := sum(t, base); got != sumBytes(want) {
			t.Fatalf("merged base sha256 %s, want %s", got, sumBytes(want))
		}
		if stat(t, base).Ino != ino {
			t.Fatal("MergeDiff replaced the base inode; it must merge in place")
		}
		if sum(t, diff) != diffSum {
			t.Fatal("MergeDiff changed the diff")
		}
	})
}

func TestMergeDiffRefusesMismatchedSize(t *testing.T) {
	dir := t.TempDir()
	base, diff := filepath.Join(dir, "memory"), filepath.Join(dir, "diff")
	writeSparse(t, base, 2*page, extent{0, fill(page, 1)})
	writeSparse(t, diff, 3*page, extent{0, fill(page, 2)})
	if err := MergeDiff(base, diff); err == nil {
		t.Fatal("MergeDiff of a diff larger than its base succeeded")
	}
	if readAt(t, base, 0, 1)[0] != 1 {
		t.Fatal("refused merge wrote the base")
	}
}

// The whole fork flow on a fork's link: share, unshare, merge. The source's
// inode and bytes must never change. The twin row skips the guard and shows
// the same check catching the corruption the guard prevents.
func TestForkUnshareMergeNeverChangesTheSource(t *testing.T) {
	for _, tc := range []struct {
		name        string
		guard       bool
		wantChanged bool
	}{
		{"guarded", true, false},
		{"guard skipped (twin: the check must see the source change)", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
				src, fork, diff := filepath.Join(dir, "memory"), filepath.Join(dir, "fork-memory"), filepath.Join(dir, "diff")
				want := mergeFixture(t, src, diff)
				srcIno, srcSum := stat(t, src).Ino, sum(t, src)
				if res, err := ShareForFork(src, fork); err != nil || res.Mode != ModeHardlink {
					t.Fatalf("ShareForFork = %+v, %v", res, err)
				}
				if tc.guard {
					if _, err := EnsureExclusive(fork); err != nil {
						t.Fatal(err)
					}
					if err := MergeDiff(fork, diff); err != nil {
						t.Fatal(err)
					}
					if sum(t, fork) != sumBytes(want) {
						t.Fatal("fork's merged bytes are wrong")
					}
				} else {
					f, err := os.OpenFile(fork, os.O_WRONLY, 0)
					if err != nil {
						t.Fatal(err)
					}
					err = (Options{}).mergeInto(f, diff)
					f.Close()
					if err != nil {
						t.Fatal(err)
					}
				}
				changed := stat(t, src).Ino != srcIno || sum(t, src) != srcSum
				if changed != tc.wantChanged {
					t.Fatalf("source changed = %v, want %v", changed, tc.wantChanged)
				}
			})
		})
	}
}

func TestMergeDiffRefusesASharedBase(t *testing.T) {
	onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
		src, fork, diff := filepath.Join(dir, "memory"), filepath.Join(dir, "fork-memory"), filepath.Join(dir, "diff")
		mergeFixture(t, src, diff)
		srcSum := sum(t, src)
		if _, err := ShareForFork(src, fork); err != nil {
			t.Fatal(err)
		}
		if err := MergeDiff(fork, diff); !errors.Is(err, ErrShared) {
			t.Fatalf("MergeDiff into a 2-link base: err = %v, want ErrShared", err)
		}
		if sum(t, src) != srcSum {
			t.Fatal("refused merge changed the shared inode")
		}
	})
}

// zeroToHoleCopy is the "optimisation" memfile must never make (dd
// conv=sparse): it skips pages of zeros, turning zero data into holes.
func zeroToHoleCopy(t *testing.T, src, dst string) {
	t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	var exts []extent
	for off := 0; off < len(data); off += page {
		p := data[off : off+page]
		if !bytes.Equal(p, make([]byte, page)) {
			exts = append(exts, extent{int64(off), p})
		}
	}
	writeSparse(t, dst, int64(len(data)), exts...)
}

// A diff moved by a copy (another filesystem, a snapshot store) must merge to
// the same result as the original. Clone keeps zero pages as data; the twin
// row shows a zero→hole copy silently losing the page the guest zeroed.
func TestCopiedDiffMergesCorrectlyOnlyIfZeroPagesStayData(t *testing.T) {
	for _, tc := range []struct {
		name        string
		copy        func(t *testing.T, src, dst string)
		wantCorrupt bool
	}{
		{"Clone", func(t *testing.T, src, dst string) {
			if _, err := Clone(src, dst); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"zero-to-hole copy (twin: must corrupt)", zeroToHoleCopy, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
				base, diff, moved := filepath.Join(dir, "memory"), filepath.Join(dir, "diff"), filepath.Join(dir, "diff-moved")
				want := mergeFixture(t, base, diff)
				tc.copy(t, diff, moved)
				if err := MergeDiff(base, moved); err != nil {
					t.Fatal(err)
				}
				zeroed := bytes.Equal(readAt(t, base, 1<<20, page), make([]byte, page))
				corrupt := sum(t, base) != sumBytes(want)
				if corrupt != tc.wantCorrupt || zeroed == tc.wantCorrupt {
					t.Fatalf("merge of copied diff: corrupt=%v (zeroed page applied=%v), want corrupt=%v", corrupt, zeroed, tc.wantCorrupt)
				}
			})
		})
	}
}
