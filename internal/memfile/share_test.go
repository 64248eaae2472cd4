package memfile

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/forkd/forkd/internal/testfs"
	"golang.org/x/sys/unix"
)

func TestShareForForkSharesInodeWithSource(t *testing.T) {
	onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
		src, dst := filepath.Join(dir, "memory"), filepath.Join(dir, "fork-memory")
		size, exts := testLayout(t)
		writeSparse(t, src, size, exts...)
		before := stat(t, src)

		res, err := ShareForFork(src, dst)
		if err != nil {
			t.Fatal(err)
		}
		if res.Mode != ModeHardlink || res.Reason != "" {
			t.Fatalf("ShareForFork = %+v, want hardlink with no reason", res)
		}
		s, d := stat(t, src), stat(t, dst)
		if s.Ino != d.Ino || s.Ino != before.Ino {
			t.Fatalf("inodes: src %d (was %d), dst %d; want one shared inode", s.Ino, before.Ino, d.Ino)
		}
		if s.Nlink != 2 {
			t.Fatalf("src nlink = %d, want 2", s.Nlink)
		}
		if s.Mtim != before.Mtim {
			t.Fatalf("src mtime changed by a hardlink: %v -> %v", before.Mtim, s.Mtim)
		}
	})
}

func TestShareForForkRefusesExistingDestination(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	writeSparse(t, src, page, extent{0, fill(page, 1)})
	writeSparse(t, dst, page, extent{0, fill(page, 2)})
	if _, err := ShareForFork(src, dst); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("ShareForFork onto an existing file: err = %v, want ErrExist", err)
	}
	if got := readAt(t, dst, 0, 1)[0]; got != 2 {
		t.Fatalf("existing dst overwritten: first byte %d, want 2", got)
	}
}

// A link across filesystems fails with EXDEV (and so does FICLONE): the fork
// must still get a complete, sparse, private copy and say why.
func TestShareForForkCopiesAcrossFilesystemsOnEXDEV(t *testing.T) {
	for _, pair := range [][2]testfs.Kind{{testfs.XFS, testfs.Ext4}, {testfs.XFS, testfs.Btrfs}, {testfs.Ext4, testfs.XFS}} {
		t.Run(string(pair[0])+"-to-"+string(pair[1]), func(t *testing.T) {
			from, to := pool.Get(t, pair[0]), pool.Get(t, pair[1])
			src, dst := filepath.Join(from.TempDir(t), "memory"), filepath.Join(to.TempDir(t), "memory")
			size, exts := testLayout(t)
			writeSparse(t, src, size, exts...)

			res, err := ShareForFork(src, dst)
			if err != nil {
				t.Fatal(err)
			}
			if res.Mode != ModeCopy || res.Reason != "EXDEV" {
				t.Fatalf("ShareForFork across filesystems = %+v, want copy because EXDEV", res)
			}
			checkCopy(t, src, dst)
		})
	}
}

// fsAppendFL is FS_APPEND_FL from <linux/fs.h>: link(2) of an append-only
// file fails with EPERM, a real way to make a same-filesystem link fail.
const fsAppendFL = 0x20

func setAppendOnly(t *testing.T, path string, on bool) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	flags, err := unix.IoctlGetUint32(int(f.Fd()), unix.FS_IOC_GETFLAGS)
	if err != nil {
		t.Fatalf("FS_IOC_GETFLAGS %s: %v", path, err)
	}
	if on {
		flags |= fsAppendFL
	} else {
		flags &^= fsAppendFL
	}
	if err := unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, int(flags)); err != nil {
		t.Fatalf("FS_IOC_SETFLAGS %s: %v", path, err)
	}
}

// When the filesystem refuses the link on the same filesystem, the fallback
// is a reflink where the filesystem has them and a sparse copy where not.
func TestShareForForkFallsBackToReflinkThenCopyWhenLinkRefused(t *testing.T) {
	onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
		src, dst := filepath.Join(dir, "memory"), filepath.Join(dir, "fork-memory")
		size, exts := testLayout(t)
		writeSparse(t, src, size, exts...)
		setAppendOnly(t, src, true)
		t.Cleanup(func() { setAppendOnly(t, src, false) })

		res, err := ShareForFork(src, dst)
		if err != nil {
			t.Fatal(err)
		}
		want := ShareResult{Mode: ModeCopy, Reason: "EPERM"}
		if kind.Reflink() {
			want.Mode = ModeReflink
		}
		if res != want {
			t.Fatalf("ShareForFork of an append-only file = %+v, want %+v", res, want)
		}
		checkCopy(t, src, dst)
	})
}

// checkCopy asserts dst is a private copy of src: other inode, same bytes,
// holes kept, the zero-data page still data, no temp left behind.
func checkCopy(t *testing.T, src, dst string) {
	t.Helper()
	s, d := stat(t, src), stat(t, dst)
	if s.Ino == d.Ino && s.Dev == d.Dev {
		t.Fatalf("copy shares inode %d with its source", s.Ino)
	}
	if d.Size != s.Size {
		t.Fatalf("copy size %d, source %d", d.Size, s.Size)
	}
	if sum(t, src) != sum(t, dst) {
		t.Fatalf("copy bytes differ from source (sha256)")
	}
	if d.Blocks > s.Blocks {
		t.Fatalf("copy allocates %d blocks, source %d: holes were filled", d.Blocks, s.Blocks)
	}
	for _, h := range testLayoutHoles {
		if !isHole(t, dst, h[0], h[1]) {
			t.Fatalf("copy has data in [%d,%d), a hole in the source", h[0], h[1])
		}
	}
	if !isData(t, dst, 1<<20) {
		t.Fatalf("copy: the page of zeros at 1 MiB became a hole; it is data in the source")
	}
	if exists(dst + ".tmp") {
		t.Fatalf("temp %s.tmp left behind", dst)
	}
}

// Invariant 1: fanout is zero-I/O. A hardlinked fork moves no mem-file byte,
// however large the file.
func TestShareForForkMovesNoBytes(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "memory"), filepath.Join(dir, "fork-memory")
	writeSparse(t, src, 32<<20, extent{0, randBytes(t, 16<<20)})
	io0 := procIO(t)
	res, err := ShareForFork(src, dst)
	io1 := procIO(t)
	if err != nil || res.Mode != ModeHardlink {
		t.Fatalf("ShareForFork = %+v, %v; want a hardlink", res, err)
	}
	if moved := io1 - io0; moved > 64<<10 {
		t.Fatalf("ShareForFork of a 32 MiB file moved %d bytes through read/write; want ~0", moved)
	}
}
