package memfile

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"syscall"
	"testing"

	"github.com/forkd/forkd/internal/testfs"
	"golang.org/x/sys/unix"
)

// pool holds the loopback filesystems shared by this binary's tests: making
// them is the slow part, so each kind is made once and removed in TestMain.
var pool *testfs.Pool

func TestMain(m *testing.M) {
	if op := os.Getenv(childOpEnv); op != "" {
		os.Exit(runChild(op))
	}
	pool = testfs.NewPool(0)
	code := m.Run()
	if err := pool.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "memfile tests: cleaning up loopback filesystems:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// onEachFS runs fn as a subtest on a fresh directory of each filesystem kind.
func onEachFS(t *testing.T, fn func(t *testing.T, kind testfs.Kind, dir string)) {
	t.Helper()
	for _, kind := range testfs.Kinds {
		t.Run(string(kind), func(t *testing.T) {
			fs := pool.Get(t, kind)
			fn(t, kind, fs.TempDir(t))
		})
	}
}

// extent is a run of data written into a test file.
type extent struct {
	off  int64
	data []byte
}

func randBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func fill(n int, v byte) []byte { return bytes.Repeat([]byte{v}, n) }

// writeSparse makes a file of size bytes holding exts as data and holes
// elsewhere, fsynced so st_blocks is settled.
func writeSparse(t testing.TB, path string, size int64, exts ...extent) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for _, e := range exts {
		if _, err := f.WriteAt(e.data, e.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// testLayout is a 16 MiB mem-file-like layout: random data, a page of zeros
// that is data (a page the guest zeroed), and holes between.
func testLayout(t testing.TB) (size int64, exts []extent) {
	return 16 << 20, []extent{
		{0, randBytes(t, 64<<10)},
		{1 << 20, fill(page, 0)}, // zero page that is data: must stay data
		{4 << 20, randBytes(t, 1<<20)},
		{(16 << 20) - 3*page, randBytes(t, 3*page)},
	}
}

// holes of testLayout that must stay holes in any copy.
var testLayoutHoles = [][2]int64{{2 << 20, 4 << 20}, {8 << 20, 15 << 20}}

func sum(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func stat(t testing.TB, path string) *syscall.Stat_t {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return &st
}

// isHole reports whether [from, to) of path holds no data.
func isHole(t testing.TB, path string, from, to int64) bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data, err := unix.Seek(int(f.Fd()), from, unix.SEEK_DATA)
	if err == unix.ENXIO {
		return true
	}
	if err != nil {
		t.Fatal(err)
	}
	return data >= to
}

// isData reports whether offset off of path is in a data extent.
func isData(t testing.TB, path string, off int64) bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	return err == nil && data == off
}

func readAt(t testing.TB, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
