package memfile

import (
	"errors"
	"io/fs"
	"path/filepath"
	"testing"

	"github.com/forkd/forkd/internal/testfs"
)

// The *Into functions make the same files as their durable counterparts,
// only without a temp name or an fsync of their own.
func TestIntoFunctionsMakeWhatTheirDurableFormsMake(t *testing.T) {
	onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
		src := filepath.Join(dir, "memory")
		size, exts := testLayout(t)
		writeSparse(t, src, size, exts...)

		res, err := Options{}.ShareInto(src, filepath.Join(dir, "linked"))
		if err != nil || res != (ShareResult{Mode: ModeHardlink}) {
			t.Fatalf("ShareInto = %+v, %v; want a hardlink", res, err)
		}
		if s, d := stat(t, src), stat(t, filepath.Join(dir, "linked")); s.Ino != d.Ino {
			t.Fatalf("ShareInto: inode %d, source %d; want one shared inode", d.Ino, s.Ino)
		}

		cloned := filepath.Join(dir, "cloned")
		mode, err := Options{}.CloneInto(src, cloned)
		want := ModeCopy
		if kind.Reflink() {
			want = ModeReflink
		}
		if err != nil || mode != want {
			t.Fatalf("CloneInto on %s = %s, %v; want %s", kind, mode, err, want)
		}
		checkCopy(t, src, cloned)

		copied := filepath.Join(dir, "copied")
		if err := (Options{}).CopyInto(src, copied); err != nil {
			t.Fatal(err)
		}
		checkCopy(t, src, copied)
		if kind.Reflink() && sharedBytes(t, copied) != 0 {
			t.Fatalf("CopyInto shares extents with its source")
		}

		for _, f := range []func() error{
			func() error { _, err := Options{}.ShareInto(src, cloned); return err },
			func() error { _, err := Options{}.CloneInto(src, cloned); return err },
			func() error { return Options{}.CopyInto(src, cloned) },
		} {
			if err := f(); !errors.Is(err, fs.ErrExist) {
				t.Fatalf("onto an existing file: err = %v, want ErrExist", err)
			}
		}
		if sum(t, cloned) != sum(t, src) {
			t.Fatal("a refused *Into call changed the existing destination")
		}
	})
}

// When the link is refused, ShareInto falls back like ShareForFork.
func TestShareIntoFallsBackToACloneWhenLinkRefused(t *testing.T) {
	onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
		src, dst := filepath.Join(dir, "memory"), filepath.Join(dir, "fork-memory")
		size, exts := testLayout(t)
		writeSparse(t, src, size, exts...)
		setAppendOnly(t, src, true)
		t.Cleanup(func() { setAppendOnly(t, src, false) })
		res, err := Options{}.ShareInto(src, dst)
		want := ShareResult{Mode: ModeCopy, Reason: "EPERM"}
		if kind.Reflink() {
			want.Mode = ModeReflink
		}
		if err != nil || res != want {
			t.Fatalf("ShareInto of an append-only file = %+v, %v; want %+v", res, err, want)
		}
		checkCopy(t, src, dst)
	})
}
