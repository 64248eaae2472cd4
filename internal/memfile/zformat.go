package memfile

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"sync"
)

// The seekable compressed format; documented in doc.go.
const (
	zMagic       = "FORKDZS1"
	zEntrySize   = 16
	zFooterSize  = 40
	zMinFrame    = 64 << 10
	zMaxFrame    = 256 << 20
	zDefaultSize = 4 << 20
)

var castagnoli = sync.OnceValue(func() *crc32.Table { return crc32.MakeTable(crc32.Castagnoli) })

// ErrCorrupt is returned for a compressed file whose footer, index or frame
// checksums do not hold.
var ErrCorrupt = errors.New("corrupt compressed mem-file")

// zEntry is one index entry: where frame i is and what it must decode to.
type zEntry struct {
	off    uint64 // byte offset of the frame in the compressed file
	length uint32 // compressed length; 0 = all-zero chunk, no frame
	crc    uint32 // crc32c of the uncompressed chunk (0 for a zero chunk)
}

type zFooter struct {
	size      uint64 // uncompressed size
	frameSize uint64
	indexOff  uint64
	indexCRC  uint32
}

func frameCount(size, frameSize int64) int64 { return (size + frameSize - 1) / frameSize }

func appendIndex(b []byte, index []zEntry) []byte {
	for _, e := range index {
		b = binary.LittleEndian.AppendUint64(b, e.off)
		b = binary.LittleEndian.AppendUint32(b, e.length)
		b = binary.LittleEndian.AppendUint32(b, e.crc)
	}
	return b
}

func appendFooter(b []byte, f zFooter) []byte {
	b = append(b, zMagic...)
	b = binary.LittleEndian.AppendUint64(b, f.size)
	b = binary.LittleEndian.AppendUint64(b, f.frameSize)
	b = binary.LittleEndian.AppendUint64(b, f.indexOff)
	b = binary.LittleEndian.AppendUint32(b, f.indexCRC)
	return binary.LittleEndian.AppendUint32(b, 0)
}

// parseFooter checks a footer against the compressed file's length.
func parseFooter(b []byte, fileLen int64) (zFooter, error) {
	if len(b) != zFooterSize || string(b[:8]) != zMagic {
		return zFooter{}, fmt.Errorf("%w: no footer (magic %q)", ErrCorrupt, b[:min(8, len(b))])
	}
	f := zFooter{
		size:      binary.LittleEndian.Uint64(b[8:]),
		frameSize: binary.LittleEndian.Uint64(b[16:]),
		indexOff:  binary.LittleEndian.Uint64(b[24:]),
		indexCRC:  binary.LittleEndian.Uint32(b[32:]),
	}
	if f.frameSize < zMinFrame || f.frameSize > zMaxFrame || f.size > 1<<50 {
		return zFooter{}, fmt.Errorf("%w: frame size %d, size %d", ErrCorrupt, f.frameSize, f.size)
	}
	n := uint64(frameCount(int64(f.size), int64(f.frameSize)))
	if f.indexOff+n*zEntrySize+zFooterSize != uint64(fileLen) {
		return zFooter{}, fmt.Errorf("%w: index at %d with %d entries does not end at the footer (file %d bytes)", ErrCorrupt, f.indexOff, n, fileLen)
	}
	return f, nil
}

func parseIndex(b []byte, f zFooter) ([]zEntry, error) {
	if crc32.Checksum(b, castagnoli()) != f.indexCRC {
		return nil, fmt.Errorf("%w: index checksum mismatch", ErrCorrupt)
	}
	index := make([]zEntry, len(b)/zEntrySize)
	for i := range index {
		e := b[i*zEntrySize:]
		index[i] = zEntry{
			off:    binary.LittleEndian.Uint64(e),
			length: binary.LittleEndian.Uint32(e[8:]),
			crc:    binary.LittleEndian.Uint32(e[12:]),
		}
		if index[i].off+uint64(index[i].length) > f.indexOff {
			return nil, fmt.Errorf("%w: frame %d [%d+%d] overlaps the index", ErrCorrupt, i, index[i].off, index[i].length)
		}
	}
	return index, nil
}
