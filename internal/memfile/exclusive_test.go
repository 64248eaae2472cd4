package memfile

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/testfs"
)

func TestEnsureExclusiveGivesAForkLinkItsOwnInodeAndLeavesTheSourceAlone(t *testing.T) {
	onEachFS(t, func(t *testing.T, kind testfs.Kind, dir string) {
		src, fork := filepath.Join(dir, "memory"), filepath.Join(dir, "fork-memory")
		size, exts := testLayout(t)
		writeSparse(t, src, size, exts...)
		if _, err := ShareForFork(src, fork); err != nil {
			t.Fatal(err)
		}
		before, srcSum := stat(t, src), sum(t, src)

		unshared, err := EnsureExclusive(fork)
		if err != nil {
			t.Fatal(err)
		}
		if !unshared {
			t.Fatal("EnsureExclusive on a file with 2 links returned false, want true")
		}
		s, f := stat(t, src), stat(t, fork)
		if s.Ino != before.Ino || s.Mtim != before.Mtim || sum(t, src) != srcSum {
			t.Fatalf("source changed: ino %d->%d, mtime %v->%v", before.Ino, s.Ino, before.Mtim, s.Mtim)
		}
		if f.Ino == s.Ino || s.Nlink != 1 || f.Nlink != 1 {
			t.Fatalf("after unshare: src ino %d nlink %d, fork ino %d nlink %d; want two private inodes", s.Ino, s.Nlink, f.Ino, f.Nlink)
		}
		checkCopy(t, src, fork)
		if exists(fork + unshareSuffix) {
			t.Fatal("unshare temp left behind")
		}
		if again, err := EnsureExclusive(fork); err != nil || again {
			t.Fatalf("second EnsureExclusive = %v, %v; want false, nil", again, err)
		}
	})
}

// procIO returns this process's rchar+wchar from /proc/self/io: bytes moved
// by read and write syscalls of every kind.
func procIO(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		t.Fatalf("no /proc/self/io (task I/O accounting), which this test measures with: %v", err)
	}
	var total int64
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ": ")
		if k == "rchar" || k == "wchar" {
			n, _ := strconv.ParseInt(v, 10, 64)
			total += n
		}
	}
	return total
}

func TestEnsureExclusiveDoesNoIOOnAPrivateFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "memory")
	writeSparse(t, path, 16<<20, extent{0, randBytes(t, 8<<20)})
	if err := os.WriteFile(path+unshareSuffix, []byte("stale"), 0o600); err != nil {
		t.Fatal(err)
	}
	before := stat(t, path)
	io0 := procIO(t)
	unshared, err := EnsureExclusive(path)
	io1 := procIO(t)
	if err != nil || unshared {
		t.Fatalf("EnsureExclusive(private) = %v, %v; want false, nil", unshared, err)
	}
	if after := stat(t, path); after.Ino != before.Ino || after.Ctim != before.Ctim || after.Mtim != before.Mtim {
		t.Fatalf("private file touched: ino %d->%d ctime %v->%v", before.Ino, after.Ino, before.Ctim, after.Ctim)
	}
	// Reading /proc/self/io itself counts a few hundred bytes; a copy of the
	// file would count megabytes.
	if moved := io1 - io0; moved > 64<<10 {
		t.Fatalf("EnsureExclusive on a private 16 MiB file moved %d bytes through read/write", moved)
	}
	if exists(path + unshareSuffix) {
		t.Fatal("stale unshare temp not removed")
	}
}

func TestEnsureExclusiveOnMissingFileSaysNotExist(t *testing.T) {
	path := filepath.Join(t.TempDir(), "memory")
	_, err := EnsureExclusive(path)
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), path) {
		t.Fatalf("EnsureExclusive(missing) err = %v; want ErrNotExist naming %s", err, path)
	}
}
