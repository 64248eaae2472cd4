package memfile

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
)

// compressFixtures are the files the round trip covers.
func compressFixtures(t *testing.T, dir string) map[string]string {
	t.Helper()
	paths := map[string]string{}
	// Sparse, like a mem-file: data, holes, a page of zeros that is data and a
	// whole frame of zeros that is data (restored as a hole).
	sparse := filepath.Join(dir, "sparse")
	size, exts := testLayout(t)
	exts = append(exts, extent{12 << 20, fill(4<<20-3*page, 0)})
	writeSparse(t, sparse, size, exts...)
	paths["sparse"] = sparse
	// Dense random bytes with a size that is not a multiple of a page.
	random := filepath.Join(dir, "random")
	writeSparse(t, random, 9<<20+1234, extent{0, randBytes(t, 9<<20+1234)})
	paths["random"] = random
	// Compressible text-like bytes.
	text := filepath.Join(dir, "text")
	writeSparse(t, text, 5<<20, extent{0, bytes.Repeat([]byte("forkd mem-file page "), (5<<20)/20)})
	paths["text"] = text
	empty := filepath.Join(dir, "empty")
	writeSparse(t, empty, 0)
	paths["empty"] = empty
	return paths
}

func TestCompressDecompressRoundTripKeepsBytesAndHoles(t *testing.T) {
	dir := t.TempDir()
	for name, src := range compressFixtures(t, dir) {
		for _, level := range []int{0, 3, 19} {
			t.Run(name+"/level"+strconv.Itoa(level), func(t *testing.T) {
				zst, out := src+".zst", src+".out"
				t.Cleanup(func() { os.Remove(zst); os.Remove(out) })
				var calls []int64
				opt := CompressOptions{Level: level, Concurrency: 2, FrameSize: 1 << 20, Progress: func(done, total int64) {
					if total != stat(t, src).Size {
						t.Errorf("progress total %d, want %d", total, stat(t, src).Size)
					}
					calls = append(calls, done)
				}}
				if err := Compress(context.Background(), src, zst, opt); err != nil {
					t.Fatal(err)
				}
				if err := Decompress(context.Background(), zst, out, nil); err != nil {
					t.Fatal(err)
				}
				if sum(t, out) != sum(t, src) {
					t.Fatal("decompressed bytes differ from the original (sha256)")
				}
				if s, o := stat(t, src), stat(t, out); o.Blocks > s.Blocks || o.Size != s.Size {
					t.Fatalf("decompressed: size %d blocks %d; original size %d blocks %d", o.Size, o.Blocks, s.Size, s.Blocks)
				}
				for i := 1; i < len(calls); i++ {
					if calls[i] <= calls[i-1] {
						t.Fatalf("progress not increasing: %v", calls)
					}
				}
				if size := stat(t, src).Size; size > 0 && (len(calls) == 0 || calls[len(calls)-1] != size) {
					t.Fatalf("progress ended at %v, want %d", calls, size)
				}
				if exists(zst+".tmp") || exists(out+".tmp") {
					t.Fatal("temp file left behind")
				}
			})
		}
	}
	t.Run("sparse frames take no space and come back as holes", func(t *testing.T) {
		src := filepath.Join(dir, "sparse")
		zst, out := src+".zst2", src+".out2"
		if err := Compress(context.Background(), src, zst, CompressOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := Decompress(context.Background(), zst, out, nil); err != nil {
			t.Fatal(err)
		}
		// testLayout has ~1.1 MiB of random data; the frame of zeros at 12 MiB
		// must cost nothing on either side.
		if z := stat(t, zst).Size; z > 2<<20 {
			t.Fatalf("compressed sparse file is %d bytes; zero and hole frames should take none", z)
		}
		if !isHole(t, out, 12<<20, 15<<20) {
			t.Fatal("a frame of zeros came back as data, want a hole")
		}
	})
}

func TestCompressedReaderReadsAnyRange(t *testing.T) {
	dir := t.TempDir()
	src := compressFixtures(t, dir)["random"]
	sparse := compressFixtures(t, t.TempDir())["sparse"]
	for _, path := range []string{src, sparse} {
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		zst := path + ".zst"
		if err := Compress(context.Background(), path, zst, CompressOptions{FrameSize: 256 << 10}); err != nil {
			t.Fatal(err)
		}
		r, err := openCompressed(zst)
		if err != nil {
			t.Fatal(err)
		}
		if r.Size() != int64(len(want)) {
			t.Fatalf("Size() = %d, want %d", r.Size(), len(want))
		}
		cases := [][2]int64{{0, 1}, {0, page}, {256<<10 - 10, 20}, {1 << 20, 3 << 20}, {int64(len(want)) - 7, 7}, {0, int64(len(want))}}
		rng := rand.New(rand.NewPCG(1, 2))
		for range 40 {
			off := rng.Int64N(int64(len(want)))
			cases = append(cases, [2]int64{off, rng.Int64N(int64(len(want)) - off + 1)})
		}
		var wg sync.WaitGroup
		for _, c := range cases {
			wg.Go(func() {
				p := make([]byte, c[1])
				n, err := r.ReadAt(p, c[0])
				if err != nil || n != len(p) || !bytes.Equal(p, want[c[0]:c[0]+c[1]]) {
					t.Errorf("ReadAt(%d bytes at %d) = %d, %v; bytes equal %v", c[1], c[0], n, err, bytes.Equal(p[:n], want[c[0]:c[0]+int64(n)]))
				}
			})
		}
		wg.Wait()
		p := make([]byte, 100)
		if n, err := r.ReadAt(p, int64(len(want))-40); n != 40 || err != io.EOF {
			t.Fatalf("ReadAt past the end = %d, %v; want 40, io.EOF", n, err)
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := r.ReadAt(p, 0); !errors.Is(err, os.ErrClosed) {
			t.Fatalf("ReadAt after Close = %v, want os.ErrClosed", err)
		}
	}
}

// Twins of the checksums: a flipped byte in a frame or in the index must be
// reported as ErrCorrupt, never returned as data.
func TestCompressedFileCorruptionIsDetected(t *testing.T) {
	dir := t.TempDir()
	src := compressFixtures(t, dir)["random"]
	zst := src + ".zst"
	if err := Compress(context.Background(), src, zst, CompressOptions{FrameSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	good, err := os.ReadFile(zst)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		at   int64
		open bool // corruption found at open (index/footer) rather than at read
	}{
		{"frame byte", 100, false},
		{"index byte", int64(len(good)) - zFooterSize - 5, true},
		{"footer magic", int64(len(good)) - zFooterSize, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := bytes.Clone(good)
			bad[tc.at] ^= 0x40
			path := filepath.Join(dir, "bad.zst")
			if err := os.WriteFile(path, bad, 0o600); err != nil {
				t.Fatal(err)
			}
			r, err := openCompressed(path)
			if tc.open {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("openCompressed = %v, want ErrCorrupt", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if _, err := r.ReadAt(make([]byte, page), 0); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("ReadAt of a corrupted frame = %v, want ErrCorrupt", err)
			}
			if err := Decompress(context.Background(), path, filepath.Join(dir, "bad.out"), nil); !errors.Is(err, ErrCorrupt) || exists(filepath.Join(dir, "bad.out")) {
				t.Fatalf("Decompress of a corrupted file = %v (output exists %v), want ErrCorrupt and no output", err, exists(filepath.Join(dir, "bad.out")))
			}
		})
	}
}

func TestCompressAndDecompressStopOnCancelAndLeaveNoFile(t *testing.T) {
	dir := t.TempDir()
	src := compressFixtures(t, dir)["random"]
	zst := src + ".zst"
	ctx, cancel := context.WithCancel(context.Background())
	err := Compress(ctx, src, zst, CompressOptions{FrameSize: 64 << 10, Concurrency: 1, Progress: func(done, total int64) {
		if done >= 1<<20 {
			cancel()
		}
	}})
	if !errors.Is(err, context.Canceled) || exists(zst) || exists(zst+".tmp") {
		t.Fatalf("cancelled Compress = %v, dst exists %v; want context.Canceled and no files", err, exists(zst))
	}
	if err := Compress(context.Background(), src, zst, CompressOptions{FrameSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	out := src + ".out"
	ctx, cancel = context.WithCancel(context.Background())
	err = Decompress(ctx, zst, out, func(done, total int64) {
		if done >= 1<<20 {
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) || exists(out) || exists(out+".tmp") {
		t.Fatalf("cancelled Decompress = %v, dst exists %v; want context.Canceled and no files", err, exists(out))
	}
}

func TestCompressRejectsBadFrameSize(t *testing.T) {
	src := compressFixtures(t, t.TempDir())["text"]
	for _, fs := range []int64{1000, 4096, 1 << 30} {
		if err := Compress(context.Background(), src, src+".zst", CompressOptions{FrameSize: fs}); err == nil {
			t.Errorf("Compress with frame size %d succeeded", fs)
		}
	}
}
