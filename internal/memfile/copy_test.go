package memfile

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"github.com/forkd/forkd/internal/testfs"
	"golang.org/x/sys/unix"
)

// Copy is the forced physical copy: on every filesystem, reflink-capable or
// not, the result is a private sparse copy that shares no disk block with its
// source. Its twin, Clone on a reflink filesystem, shows the check can fail.
func TestCopySharesNoExtentWithSourceEvenWhereReflinkWorks(t *testing.T) {
	onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
		src, dst, clone := filepath.Join(dir, "memory"), filepath.Join(dir, "copy"), filepath.Join(dir, "clone")
		size, exts := testLayout(t)
		writeSparse(t, src, size, exts...)
		srcSum := sum(t, src)
		if err := Copy(src, dst); err != nil {
			t.Fatal(err)
		}
		checkCopy(t, src, dst)
		if n := sharedBytes(t, dst); n != 0 {
			t.Fatalf("Copy on %s: %d bytes of the copy share extents with another file", kind, n)
		}
		if sum(t, src) != srcSum || sharedBytes(t, src) != 0 {
			t.Fatalf("Copy on %s changed the source or made it share extents", kind)
		}
		if st, _ := os.Stat(dst); st.Mode().Perm() != 0o600 {
			t.Fatalf("copy mode %v, want the source's 0600", st.Mode().Perm())
		}
		if !kind.Reflink() {
			return
		}
		// Twin: a reflink Clone of the same file does share extents.
		if _, err := Clone(src, clone); err != nil {
			t.Fatal(err)
		}
		if sharedBytes(t, clone) == 0 {
			t.Fatalf("Clone on %s shares no extent: the shared-extent check cannot see a reflink", kind)
		}
	})
}

func TestCopyRefusesExistingDestinationAndMissingSource(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "memory"), filepath.Join(dir, "copy")
	if err := Copy(src, dst); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Copy of a missing file: err = %v, want ErrNotExist", err)
	}
	if exists(dst) || exists(dst+".tmp") {
		t.Fatal("failed Copy left files behind")
	}
	writeSparse(t, src, page, extent{0, fill(page, 1)})
	writeSparse(t, dst, page, extent{0, fill(page, 2)})
	if err := Copy(src, dst); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("Copy onto an existing file: err = %v, want ErrExist", err)
	}
	if got := readAt(t, dst, 0, page); got[0] != 2 {
		t.Fatal("Copy onto an existing file changed it")
	}
}

// sharedBytes sums the extents of path that FIEMAP flags as shared with
// another file (a reflink).
func sharedBytes(t *testing.T, path string) int64 {
	t.Helper()
	const (
		fsIocFiemap   = 0xC020660B // _IOWR('f', 11, struct fiemap)
		flagSync      = 0x1        // FIEMAP_FLAG_SYNC
		extentShared  = 0x2000     // FIEMAP_EXTENT_SHARED
		extentLast    = 0x1        // FIEMAP_EXTENT_LAST
		maxExtents    = 128
		headerSize    = 32
		extentSize    = 56
		extentFlagsAt = 40
	)
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var shared int64
	start := uint64(0)
	buf := make([]byte, headerSize+maxExtents*extentSize)
	for {
		clear(buf)
		ne := (*[4]uint64)(unsafe.Pointer(&buf[0]))
		ne[0], ne[1] = start, ^uint64(0)-start
		hdr := (*[8]uint32)(unsafe.Pointer(&buf[0]))
		hdr[4], hdr[6] = flagSync, maxExtents
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
			t.Fatalf("FIEMAP %s: %v", path, errno)
		}
		mapped := int(hdr[5])
		if mapped == 0 {
			return shared
		}
		var last bool
		for i := range mapped {
			e := buf[headerSize+i*extentSize:]
			ext := (*[3]uint64)(unsafe.Pointer(&e[0]))
			flags := *(*uint32)(unsafe.Pointer(&e[extentFlagsAt]))
			if flags&extentShared != 0 {
				shared += int64(ext[2])
			}
			start = ext[0] + ext[2]
			last = flags&extentLast != 0
		}
		if last {
			return shared
		}
	}
}
