package memfile

import (
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// compressedReader reads ranges of a compressed mem-file without
// decompressing the rest: ReadAt decodes only the frames it covers. It is
// safe for concurrent use.
type compressedReader struct {
	f         *os.File
	size      int64
	frameSize int64
	index     []zEntry
	dec       *zstd.Decoder

	mu       sync.Mutex // guards the one-frame cache below and closed
	closed   bool
	cacheIdx int64 // frame held in cache; -1 for none
	cache    []byte
}

// openCompressed opens a file written by Compress and checks its footer and
// index (ErrCorrupt if they do not hold).
func openCompressed(path string) (*compressedReader, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open compressed %s: %w", path, err)
	}
	r, err := newcompressedReader(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open compressed %s: %w", path, err)
	}
	return r, nil
}

func newcompressedReader(f *os.File) (*compressedReader, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() < zFooterSize {
		return nil, fmt.Errorf("%w: %d bytes is shorter than the footer", ErrCorrupt, st.Size())
	}
	fb := make([]byte, zFooterSize)
	if _, err := f.ReadAt(fb, st.Size()-zFooterSize); err != nil {
		return nil, err
	}
	footer, err := parseFooter(fb, st.Size())
	if err != nil {
		return nil, err
	}
	ib := make([]byte, st.Size()-zFooterSize-int64(footer.indexOff))
	if _, err := f.ReadAt(ib, int64(footer.indexOff)); err != nil {
		return nil, err
	}
	index, err := parseIndex(ib, footer)
	if err != nil {
		return nil, err
	}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderMaxMemory(footer.frameSize))
	if err != nil {
		return nil, err
	}
	return &compressedReader{f: f, size: int64(footer.size), frameSize: int64(footer.frameSize), index: index, dec: dec, cacheIdx: -1}, nil
}

// Size is the uncompressed size.
func (r *compressedReader) Size() int64 { return r.size }

// ReadAt reads len(p) uncompressed bytes at off, as io.ReaderAt.
func (r *compressedReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read compressed %s at %d: negative offset", r.f.Name(), off)
	}
	r.mu.Lock()
	closed := r.closed
	r.mu.Unlock()
	if closed {
		return 0, fmt.Errorf("read compressed %s: %w", r.f.Name(), os.ErrClosed)
	}
	n := 0
	for n < len(p) && off < r.size {
		i := off / r.frameSize
		within := off - i*r.frameSize
		frameLen := min(r.frameSize, r.size-i*r.frameSize)
		want := min(int64(len(p)-n), frameLen-within)
		if r.index[i].length == 0 {
			clear(p[n : n+int(want)])
		} else if err := r.copyFromFrame(p[n:n+int(want)], i, within); err != nil {
			return n, err
		}
		n += int(want)
		off += want
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// copyFromFrame fills p from frame i starting at within, decoding the frame
// unless it is the cached one. Sequential small reads (a pager's pages) then
// decode each frame once.
func (r *compressedReader) copyFromFrame(p []byte, i, within int64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return fmt.Errorf("read compressed %s: %w", r.f.Name(), os.ErrClosed)
	}
	if r.cacheIdx != i {
		frame, err := r.decodeFrame(i, r.cache[:0])
		if err != nil {
			r.cacheIdx = -1
			return err
		}
		r.cache, r.cacheIdx = frame, i
	}
	copy(p, r.cache[within:])
	return nil
}

// decodeFrame decodes frame i (which must have data) into dst and checks
// its length and checksum.
func (r *compressedReader) decodeFrame(i int64, dst []byte) ([]byte, error) {
	e := r.index[i]
	comp := make([]byte, e.length)
	if _, err := r.f.ReadAt(comp, int64(e.off)); err != nil {
		return nil, fmt.Errorf("read compressed %s: frame %d: %w", r.f.Name(), i, err)
	}
	out, err := r.dec.DecodeAll(comp, dst)
	if err != nil {
		return nil, fmt.Errorf("read compressed %s: frame %d: %w: %v", r.f.Name(), i, ErrCorrupt, err)
	}
	wantLen := min(r.frameSize, r.size-i*r.frameSize)
	if int64(len(out)) != wantLen || crc32.Checksum(out, castagnoli()) != e.crc {
		return nil, fmt.Errorf("read compressed %s: frame %d: %w: length %d (want %d) or checksum mismatch", r.f.Name(), i, ErrCorrupt, len(out), wantLen)
	}
	return out, nil
}

// Close releases the file and decoder.
func (r *compressedReader) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	r.dec.Close()
	return r.f.Close()
}
