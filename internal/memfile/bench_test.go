package memfile

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/testfs"
)

// BenchmarkForkCopy compares the ways a fork can get its mem-file, for a
// 1 GiB mostly-sparse and a 1 GiB dense file on XFS (reflink) and ext4
// (none). Every op fsyncs what it made. Each sub-benchmark also reports
// "of-full-copy": its time per op over the full copy's, measured first in the
// same run, and "MiB-new-on-disk": the filesystem's free space it used. It needs root and makes 4 GiB sparse loopback images, so it runs
// only with -bench (go test -run '^$' -bench ForkCopy -benchtime 3x).
func BenchmarkForkCopy(b *testing.B) {
	const size = 1 << 30
	for _, kind := range []testfs.Kind{testfs.XFS, testfs.Ext4} {
		b.Run("fs="+string(kind), func(b *testing.B) {
			fs := testfs.Mount(b, kind, 4<<30)
			for _, file := range []string{"sparse", "dense"} {
				b.Run("file="+file, func(b *testing.B) {
					src := filepath.Join(fs.Dir, file)
					writeBenchFile(b, src, size, file == "dense")
					var baseline float64
					for _, op := range benchOps {
						b.Run("op="+op.name, func(b *testing.B) {
							var newBytes int64
							b.StopTimer()
							b.ResetTimer()
							for i := 0; i < b.N; i++ {
								dst := filepath.Join(fs.Dir, fmt.Sprintf("%s-%s-%d", file, op.name, i))
								var free int64
								if i == b.N-1 {
									free = freeBytes(b, fs.Dir)
								}
								b.StartTimer()
								if err := op.run(src, dst); err != nil {
									b.Fatal(err)
								}
								b.StopTimer()
								if i == b.N-1 {
									newBytes = free - freeBytes(b, fs.Dir)
								}
								if err := os.Remove(dst); err != nil {
									b.Fatal(err)
								}
							}
							perOp := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
							if op.name == "full-copy" {
								baseline = perOp
							}
							if baseline > 0 {
								b.ReportMetric(perOp/baseline, "of-full-copy")
							}
							b.ReportMetric(float64(newBytes)/(1<<20), "MiB-new-on-disk")
						})
					}
				})
			}
		})
	}
}

// freeBytes is the filesystem's free space once it has settled; an op's cost
// on disk is the drop. XFS frees a removed file's blocks in the background,
// which would otherwise offset the next op's use, so wait until two reads
// 200 ms apart agree.
func freeBytes(b *testing.B, dir string) int64 {
	d, err := os.Open(dir)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	read := func() int64 {
		if err := unix.Syncfs(int(d.Fd())); err != nil {
			b.Fatal(err)
		}
		var st unix.Statfs_t
		if err := unix.Fstatfs(int(d.Fd()), &st); err != nil {
			b.Fatal(err)
		}
		return int64(st.Bfree) * st.Bsize
	}
	prev := read()
	for range 50 {
		time.Sleep(200 * time.Millisecond)
		cur := read()
		if cur == prev {
			break
		}
		prev = cur
	}
	return prev
}

// benchOps run in this order; full-copy first as the baseline.
var benchOps = []struct {
	name string
	run  func(src, dst string) error
}{
	{"full-copy", func(src, dst string) error { return copyWith(src, dst, fullCopy) }},
	{"sparse-copy", func(src, dst string) error {
		return copyWith(src, dst, func(in, out *os.File, size int64) error {
			return (Options{}).sparseCopy(in, out, size, true) // pread/pwrite: always a physical copy
		})
	}},
	{"clone", func(src, dst string) error { _, err := Clone(src, dst); return err }},
	{"share", func(src, dst string) error { _, err := ShareForFork(src, dst); return err }},
}

// fullCopy is the naive copy: every byte, holes filled with zeros.
func fullCopy(in, out *os.File, size int64) error {
	c := &rangeCopier{src: in, dst: out, noCFR: true}
	return c.copy(0, size)
}

func copyWith(src, dst string, copy func(in, out *os.File, size int64) error) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := copy(in, out, st.Size()); err != nil {
		return err
	}
	return out.Sync()
}

// writeBenchFile writes a 1 GiB source: dense = all random bytes; sparse =
// 1 MiB of random data every 16 MiB (64 MiB of data, 6%), holes elsewhere.
func writeBenchFile(b *testing.B, path string, size int64, dense bool) {
	b.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		b.Fatal(err)
	}
	rng := rand.NewChaCha8([32]byte{1})
	buf := make([]byte, 4<<20)
	step, n := int64(len(buf)), int64(len(buf))
	if !dense {
		step, n = 16<<20, 1<<20
	}
	for off := int64(0); off < size; off += step {
		rng.Read(buf[:n])
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			b.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
}
