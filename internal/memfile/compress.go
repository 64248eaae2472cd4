package memfile

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"runtime"

	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
)

// CompressOptions tunes Compress. The zero value is valid.
type CompressOptions struct {
	// Level is a zstd level (1 fastest ... 19 best); 0 means 1. Mem-files
	// are large and mostly zero or incompressible, so fast is the default.
	Level int
	// Concurrency caps the frames compressed at once; 0 means GOMAXPROCS.
	Concurrency int
	// FrameSize is the uncompressed bytes per seekable frame, a multiple of
	// 4096 between 64 KiB and 256 MiB; 0 means 4 MiB.
	FrameSize int64
	// Progress, when set, is called from one goroutine after each frame with
	// the uncompressed bytes done and the total.
	Progress func(done, total int64)
}

func (o CompressOptions) normalize() (CompressOptions, error) {
	if o.Level == 0 {
		o.Level = 1
	}
	if o.Concurrency <= 0 {
		o.Concurrency = runtime.GOMAXPROCS(0)
	}
	if o.FrameSize == 0 {
		o.FrameSize = zDefaultSize
	}
	if o.FrameSize < zMinFrame || o.FrameSize > zMaxFrame || o.FrameSize%page != 0 {
		return o, fmt.Errorf("frame size %d: want a multiple of %d in [%d, %d]", o.FrameSize, page, zMinFrame, zMaxFrame)
	}
	return o, nil
}

const page = 4096

// frameResult is one compressed frame, waiting for its turn to be written.
type frameResult struct {
	data []byte // compressed; nil for an all-zero chunk
	crc  uint32
	n    int64 // uncompressed length
}

// Compress writes dst, a seekable zstd image of src (format in doc.go), via
// dst+".tmp", fsync and rename. Chunks that are holes in src are not read;
// chunks of all zeros take no space and decompress to holes. Frames are
// compressed in parallel (capped by opt.Concurrency) and written in order.
func Compress(ctx context.Context, src, dst string, opt CompressOptions) error {
	opt, err := opt.normalize()
	if err != nil {
		return fmt.Errorf("compress %s: %w", src, err)
	}
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("compress %s: %w", src, err)
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return fmt.Errorf("compress %s: %w", src, err)
	}
	enc, err := zstd.NewWriter(nil,
		zstd.WithEncoderLevel(zstd.EncoderLevelFromZstd(opt.Level)),
		zstd.WithEncoderConcurrency(opt.Concurrency),
		zstd.WithEncoderCRC(false), // each frame's crc32c is in the index
	)
	if err != nil {
		return fmt.Errorf("compress %s: %w", src, err)
	}
	defer enc.Close()
	err = atomicfile.Write(dst, st.Mode().Perm(), func(w io.Writer) error {
		return compressTo(ctx, in, st.Size(), w, enc, opt)
	})
	if err != nil {
		return fmt.Errorf("compress %s to %s: %w", src, dst, err)
	}
	return nil
}

func compressTo(ctx context.Context, in *os.File, size int64, w io.Writer, enc *zstd.Encoder, opt CompressOptions) error {
	n := frameCount(size, opt.FrameSize)
	g, ctx := errgroup.WithContext(ctx)
	// order carries each frame's result slot to the writer in frame order; its
	// capacity bounds the frames in memory to about 2x the workers.
	order := make(chan chan frameResult, opt.Concurrency)
	jobs := make(chan int64)
	slots := make([]chan frameResult, n)
	for i := range slots {
		slots[i] = make(chan frameResult, 1)
	}
	g.Go(func() error {
		defer close(jobs)
		defer close(order)
		for i := range n {
			select {
			case order <- slots[i]:
			case <-ctx.Done():
				return ctx.Err()
			}
			select {
			case jobs <- i:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	})
	zeros := make([]byte, opt.FrameSize)
	for range opt.Concurrency {
		g.Go(func() error {
			buf := make([]byte, opt.FrameSize)
			for i := range jobs {
				r, err := compressFrame(in, i, size, opt.FrameSize, buf, zeros, enc)
				if err != nil {
					return err
				}
				slots[i] <- r
			}
			return nil
		})
	}
	g.Go(func() error {
		index := make([]zEntry, 0, n)
		var off uint64
		var done int64
		for slot := range order {
			var r frameResult
			select {
			case r = <-slot:
			case <-ctx.Done():
				return ctx.Err()
			}
			e := zEntry{off: off, length: uint32(len(r.data)), crc: r.crc}
			if _, err := w.Write(r.data); err != nil {
				return err
			}
			off += uint64(len(r.data))
			index = append(index, e)
			done += r.n
			if opt.Progress != nil {
				opt.Progress(done, size)
			}
		}
		if int64(len(index)) != n {
			return ctx.Err() // the producer stopped early: cancelled
		}
		ib := appendIndex(nil, index)
		tail := appendFooter(ib, zFooter{size: uint64(size), frameSize: uint64(opt.FrameSize), indexOff: off, indexCRC: crc32.Checksum(ib, castagnoli())})
		_, err := w.Write(tail)
		return err
	})
	return g.Wait()
}

// compressFrame reads and compresses chunk i. A chunk with no data extent
// is not read at all; a chunk of zeros has no frame.
func compressFrame(in *os.File, i, size, frameSize int64, buf, zeros []byte, enc *zstd.Encoder) (frameResult, error) {
	start := i * frameSize
	n := min(frameSize, size-start)
	if hole, err := isHoleRange(in, start, start+n); err != nil {
		return frameResult{}, err
	} else if hole {
		return frameResult{n: n}, nil
	}
	b := buf[:n]
	if _, err := in.ReadAt(b, start); err != nil {
		return frameResult{}, fmt.Errorf("read frame %d at %d: %w", i, start, err)
	}
	if bytes.Equal(b, zeros[:n]) {
		return frameResult{n: n}, nil
	}
	return frameResult{data: enc.EncodeAll(b, nil), crc: crc32.Checksum(b, castagnoli()), n: n}, nil
}

// isHoleRange reports whether [from, to) of f holds no data extent. Without
// SEEK_DATA support it reports false (read it and look).
func isHoleRange(f *os.File, from, to int64) (bool, error) {
	data, err := unix.Seek(int(f.Fd()), from, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		return true, nil
	case errors.Is(err, unix.EINVAL), errors.Is(err, unix.EOPNOTSUPP):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("seek data at %d: %w", from, err)
	}
	return data >= to, nil
}
