package memfile

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"

	"github.com/forkd/forkd/internal/atomicfile"
	"golang.org/x/sync/errgroup"
)

// Decompress restores dst from src, a file written by Compress, via
// dst+".tmp", fsync and rename. Frames are decoded in parallel (GOMAXPROCS
// at most) and checked against their crc32c. Pages of zeros are left as
// holes, so the result is as sparse as it can be and reads back byte for
// byte the same; it is a full image, never a diff layer (in a diff a hole
// means "clean page" and a page of zeros must be data). progress, when set,
// is called from one goroutine at a time with the bytes done and the total.
func Decompress(ctx context.Context, src, dst string, progress func(done, total int64)) error {
	r, err := openCompressed(src)
	if err != nil {
		return fmt.Errorf("decompress %s: %w", src, err)
	}
	defer r.Close()
	st, err := r.f.Stat()
	if err != nil {
		return fmt.Errorf("decompress %s: %w", src, err)
	}
	err = atomicfile.Write(dst, st.Mode().Perm(), func(w io.Writer) error {
		out, ok := w.(*os.File)
		if !ok {
			return fmt.Errorf("atomic writer is %T, not a file", w)
		}
		return r.decompressTo(ctx, out, progress)
	})
	if err != nil {
		return fmt.Errorf("decompress %s to %s: %w", src, dst, err)
	}
	return nil
}

func (r *compressedReader) decompressTo(ctx context.Context, out *os.File, progress func(done, total int64)) error {
	if err := out.Truncate(r.size); err != nil {
		return err
	}
	var (
		mu   sync.Mutex // serialises progress calls and guards done
		done int64
	)
	report := func(n int64) {
		mu.Lock()
		defer mu.Unlock()
		done += n
		if progress != nil {
			progress(done, r.size)
		}
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(runtime.GOMAXPROCS(0))
	zeroPage := make([]byte, page)
	bufs := sync.Pool{New: func() any { b := make([]byte, 0, r.frameSize); return &b }}
	for i := range int64(len(r.index)) {
		if gctx.Err() != nil {
			break
		}
		n := min(r.frameSize, r.size-i*r.frameSize)
		if r.index[i].length == 0 {
			report(n) // a hole already: the file was sized with no data
			continue
		}
		g.Go(func() error {
			if err := gctx.Err(); err != nil {
				return err
			}
			buf := bufs.Get().(*[]byte)
			defer bufs.Put(buf)
			frame, err := r.decodeFrame(i, (*buf)[:0])
			if err != nil {
				return err
			}
			*buf = frame[:0]
			if err := writeNonZeroPages(out, frame, i*r.frameSize, zeroPage); err != nil {
				return err
			}
			report(n)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	return ctx.Err()
}

// writeNonZeroPages writes b at off, skipping whole pages of zeros (the
// file was sized first, so skipped pages are holes that read as zeros).
func writeNonZeroPages(f *os.File, b []byte, off int64, zeroPage []byte) error {
	fd := int(f.Fd())
	for start := 0; start < len(b); {
		// Find the next run of non-zero pages and write it in one call.
		for start < len(b) && bytes.Equal(b[start:min(start+page, len(b))], zeroPage[:min(page, len(b)-start)]) {
			start += page
		}
		end := start
		for end < len(b) && !bytes.Equal(b[end:min(end+page, len(b))], zeroPage[:min(page, len(b)-end)]) {
			end += page
		}
		end = min(end, len(b))
		if start < end {
			if err := pwriteAll(fd, b[start:end], off+int64(start)); err != nil {
				return err
			}
		}
		start = end
	}
	return nil
}
