package memfile

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/forkd/forkd/internal/testfs"
)

func TestCloneReflinksWhereSupportedElseSparseCopies(t *testing.T) {
	onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
		src, dst := filepath.Join(dir, "memory"), filepath.Join(dir, "clone")
		size, exts := testLayout(t)
		writeSparse(t, src, size, exts...)
		before := stat(t, src)
		srcSum := sum(t, src)

		mode, err := Clone(src, dst)
		if err != nil {
			t.Fatal(err)
		}
		want := ModeCopy
		if kind.Reflink() {
			want = ModeReflink
		}
		if mode != want {
			t.Fatalf("Clone on %s = %s, want %s", kind, mode, want)
		}
		checkCopy(t, src, dst)
		if after := stat(t, src); after.Ino != before.Ino || after.Nlink != 1 || sum(t, src) != srcSum {
			t.Fatalf("source changed by Clone: ino %d->%d nlink %d", before.Ino, after.Ino, after.Nlink)
		}
		if st, _ := os.Stat(dst); st.Mode().Perm() != 0o600 {
			t.Fatalf("clone mode %v, want the source's 0600", st.Mode().Perm())
		}
	})
}

func TestCloneReplacesStaleTempAndRefusesExistingDestination(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "memory"), filepath.Join(dir, "clone")
	size, exts := testLayout(t)
	writeSparse(t, src, size, exts...)
	// A stale temp from a crash, hardlinked to a file that must not change.
	other := filepath.Join(dir, "other")
	writeSparse(t, other, page, extent{0, fill(page, 7)})
	if err := os.Link(other, dst+".tmp"); err != nil {
		t.Fatal(err)
	}
	if _, err := Clone(src, dst); err != nil {
		t.Fatal(err)
	}
	if sum(t, dst) != sum(t, src) {
		t.Fatal("clone bytes differ from source")
	}
	if got := readAt(t, other, 0, page); got[0] != 7 || len(got) != page {
		t.Fatal("Clone wrote into the inode of a stale temp file")
	}
	if _, err := Clone(src, dst); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("Clone onto an existing file: err = %v, want ErrExist", err)
	}
}

func TestCloneOfMissingSourceFailsAndLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	dst := filepath.Join(dir, "clone")
	if _, err := Clone(filepath.Join(dir, "nope"), dst); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Clone of a missing file: err = %v, want ErrNotExist", err)
	}
	if exists(dst) || exists(dst+".tmp") {
		t.Fatal("failed Clone left files behind")
	}
}

// The sparse copy path, run directly so it is covered on reflink-capable
// filesystems too, through both copy_file_range and pread/pwrite: holes stay
// holes, a page of zeros that is data stays data.
func TestSparseCopyKeepsHolesAndZeroDataPages(t *testing.T) {
	for _, tc := range []struct {
		name  string
		noCFR bool
	}{{"copy_file_range", false}, {"pread-pwrite", true}} {
		t.Run(tc.name, func(t *testing.T) {
			onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
				src, dst := filepath.Join(dir, "memory"), filepath.Join(dir, "copy")
				size, exts := testLayout(t)
				writeSparse(t, src, size, exts...)
				in, err := os.Open(src)
				if err != nil {
					t.Fatal(err)
				}
				defer in.Close()
				out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
				if err != nil {
					t.Fatal(err)
				}
				if err := (Options{}).sparseCopy(in, out, size, tc.noCFR); err != nil {
					t.Fatal(err)
				}
				if err := out.Sync(); err != nil {
					t.Fatal(err)
				}
				out.Close()
				checkCopy(t, src, dst)
			})
		})
	}
}

// CanReflink says what Clone will do on each filesystem, and leaves
// nothing behind.
func TestCanReflinkMatchesTheFilesystem(t *testing.T) {
	onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
		ok, err := CanReflink(dir)
		if err != nil {
			t.Fatal(err)
		}
		if ok != kind.Reflink() {
			t.Errorf("CanReflink on %s = %v, want %v", kind, ok, kind.Reflink())
		}
		if ents, _ := os.ReadDir(dir); len(ents) != 0 {
			t.Errorf("the probe left %d files behind", len(ents))
		}
	})
}

// CloneFile reads only through the handle it is given: the path it was
// opened at may be replaced afterwards without changing what is cloned.
func TestCloneFileReadsTheHandleNotThePath(t *testing.T) {
	onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
		src, dst := filepath.Join(dir, "disk"), filepath.Join(dir, "clone")
		if err := os.WriteFile(src, fill(8192, 'a'), 0o600); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(src)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		os.Remove(src)
		if err := os.WriteFile(src, fill(8192, 'z'), 0o600); err != nil { // swapped after the open
			t.Fatal(err)
		}
		if _, err := CloneFile(f, dst); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(dst)
		if string(b) != string(fill(8192, 'a')) {
			t.Errorf("the clone holds the swapped file's bytes, not the handle's")
		}
	})
}
