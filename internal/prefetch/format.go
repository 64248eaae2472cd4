package prefetch

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"regexp"
	"slices"
	"sync"
	"time"

	"github.com/forkd/forkd/internal/atomicfile"
)

// The recording file (all integers little-endian):
//
//	magic       [8]byte  "FORKDWS1"
//	version     u32      1
//	page size   u32      bytes (4096)
//	file size   u64      the mem-file's size in bytes
//	window      u64      the time budget it was recorded within, ns
//	recorded at i64      unix ns
//	source      u8       1 = uffd (the pager's fault log), 2 = file (the VMM's mapped pages)
//	key length  u8
//	reserved    u16      0
//	count       u32      pages
//	key         [key length]byte
//	pages       count varints: the first page index as a uvarint, then each
//	            next one as a zigzag varint delta from the previous
//	crc32c      u32      of every byte before it
//
// A version other than 1 is refused: a newer forkd's recording is simply
// recorded again.
const (
	magic         = "FORKDWS1"
	formatVersion = 1
	headerLen     = 48
)

// Sources of a recording.
const (
	SourceUffd = "uffd" // the pager's log of first faults
	SourceFile = "file" // the pages a File-restored VMM mapped, sampled
)

// MaxPages bounds a recording (1 TiB of 4 KiB pages): a count above it is
// corruption, not a working set.
const MaxPages = 1 << 28

var (
	// ErrStale is a recording of another cache key or mem-file size: it
	// describes other bytes and must not be used.
	ErrStale = errors.New("working-set recording is stale")
	// ErrCorrupt is a recording that does not decode (bad magic, version,
	// checksum, or contents).
	ErrCorrupt = errors.New("working-set recording is corrupt")
)

var crcTable = sync.OnceValue(func() *crc32.Table { return crc32.MakeTable(crc32.Castagnoli) })

// keyPattern is what a snapshot cache key looks like (hex; forkd's are 24
// digits). Anything else never names a recording.
var keyPattern = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[0-9a-f]{1,64}$`) })

// Recording is one working set: the pages of a mem-file a restore touched
// first, in the order it touched them.
type Recording struct {
	// Key is the snapshot cache key of the mem-file's bytes.
	Key string
	// PageSize is the page size in bytes (4096).
	PageSize uint32
	// FileSize is the mem-file's size in bytes.
	FileSize int64
	// Source is SourceUffd or SourceFile.
	Source string
	// Window is the time budget the recording was taken within.
	Window time.Duration
	// RecordedAt is when it was taken.
	RecordedAt time.Time
	// Pages are page indices into the mem-file (byte offset / PageSize),
	// first touch first, each at most once.
	Pages []uint64
}

// Validate checks a recording's fields: a key, a page size that is a power
// of two, every page inside the file and none twice.
func (r Recording) Validate() error {
	if !keyPattern().MatchString(r.Key) {
		return fmt.Errorf("%w: cache key %q is not hex", ErrCorrupt, r.Key)
	}
	if r.PageSize == 0 || r.PageSize&(r.PageSize-1) != 0 {
		return fmt.Errorf("%w: page size %d", ErrCorrupt, r.PageSize)
	}
	if r.FileSize < 0 {
		return fmt.Errorf("%w: file size %d", ErrCorrupt, r.FileSize)
	}
	if r.Source != SourceUffd && r.Source != SourceFile {
		return fmt.Errorf("%w: source %q", ErrCorrupt, r.Source)
	}
	if len(r.Pages) > MaxPages {
		return fmt.Errorf("%w: %d pages", ErrCorrupt, len(r.Pages))
	}
	filePages := uint64(r.FileSize) / uint64(r.PageSize)
	for i, p := range r.Pages {
		if p >= filePages {
			return fmt.Errorf("%w: page %d (entry %d) is past the end of a %d-page file", ErrCorrupt, p, i, filePages)
		}
	}
	// Sorting a copy, not a bitmap of the file: a corrupt file size must
	// not make us allocate for it.
	sorted := slices.Clone(r.Pages)
	slices.Sort(sorted)
	for i := 1; i < len(sorted); i++ {
		if sorted[i] == sorted[i-1] {
			return fmt.Errorf("%w: page %d recorded twice", ErrCorrupt, sorted[i])
		}
	}
	return nil
}

// Encode returns the file form of r.
func Encode(r Recording) ([]byte, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	src := byte(1)
	if r.Source == SourceFile {
		src = 2
	}
	b := make([]byte, headerLen, headerLen+len(r.Key)+2*len(r.Pages)+4)
	copy(b, magic)
	le := binary.LittleEndian
	le.PutUint32(b[8:], formatVersion)
	le.PutUint32(b[12:], r.PageSize)
	le.PutUint64(b[16:], uint64(r.FileSize))
	le.PutUint64(b[24:], uint64(r.Window))
	le.PutUint64(b[32:], uint64(r.RecordedAt.UnixNano()))
	b[40], b[41] = src, byte(len(r.Key))
	le.PutUint32(b[44:], uint32(len(r.Pages)))
	b = append(b, r.Key...)
	var prev uint64
	for i, p := range r.Pages {
		if i == 0 {
			b = binary.AppendUvarint(b, p)
		} else {
			b = binary.AppendVarint(b, int64(p-prev))
		}
		prev = p
	}
	return le.AppendUint32(b, crc32.Checksum(b, crcTable())), nil
}

// Decode parses and validates a recording file's bytes.
func Decode(b []byte) (Recording, error) {
	if len(b) < headerLen+4 || string(b[:8]) != magic {
		return Recording{}, fmt.Errorf("%w: not a recording (bad magic or %d bytes)", ErrCorrupt, len(b))
	}
	le := binary.LittleEndian
	body, sum := b[:len(b)-4], le.Uint32(b[len(b)-4:])
	if crc32.Checksum(body, crcTable()) != sum {
		return Recording{}, fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	if v := le.Uint32(b[8:]); v != formatVersion {
		return Recording{}, fmt.Errorf("%w: format version %d, want %d", ErrCorrupt, v, formatVersion)
	}
	r := Recording{
		PageSize:   le.Uint32(b[12:]),
		FileSize:   int64(le.Uint64(b[16:])),
		Window:     time.Duration(le.Uint64(b[24:])),
		RecordedAt: time.Unix(0, int64(le.Uint64(b[32:]))),
	}
	switch b[40] {
	case 1:
		r.Source = SourceUffd
	case 2:
		r.Source = SourceFile
	default:
		return Recording{}, fmt.Errorf("%w: source %d", ErrCorrupt, b[40])
	}
	klen, count := int(b[41]), le.Uint32(b[44:])
	if count > MaxPages || headerLen+klen > len(body) {
		return Recording{}, fmt.Errorf("%w: %d pages, key of %d bytes in %d", ErrCorrupt, count, klen, len(b))
	}
	r.Key = string(body[headerLen : headerLen+klen])
	rd := bytes.NewReader(body[headerLen+klen:])
	r.Pages = make([]uint64, 0, min(count, uint32(len(body))))
	var prev uint64
	for i := range count {
		var p uint64
		if i == 0 {
			v, err := binary.ReadUvarint(rd)
			if err != nil {
				return Recording{}, fmt.Errorf("%w: page %d: %v", ErrCorrupt, i, err)
			}
			p = v
		} else {
			d, err := binary.ReadVarint(rd)
			if err != nil {
				return Recording{}, fmt.Errorf("%w: page %d: %v", ErrCorrupt, i, err)
			}
			p = prev + uint64(d)
		}
		r.Pages = append(r.Pages, p)
		prev = p
	}
	if rd.Len() != 0 {
		return Recording{}, fmt.Errorf("%w: %d bytes after the last page", ErrCorrupt, rd.Len())
	}
	if err := r.Validate(); err != nil {
		return Recording{}, err
	}
	return r, nil
}

// Write stores r at path through the one crash-safe write (temp, fsync,
// rename, fsync of the directory): a reader never sees half a recording.
func Write(path string, r Recording) error {
	b, err := Encode(r)
	if err != nil {
		return fmt.Errorf("write recording %s: %w", path, err)
	}
	if err := atomicfile.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("write recording: %w", err)
	}
	return nil
}

// Load reads the recording at path for the mem-file of cache key key and
// size fileSize. A missing file is an error for which errors.Is(err,
// os.ErrNotExist) holds; a file of another key or size is ErrStale; one
// that does not decode, ErrCorrupt.
func Load(path, key string, fileSize int64) (Recording, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Recording{}, fmt.Errorf("load recording: %w", err)
	}
	return Parse(path, b, key, fileSize)
}

// Parse is Load of the bytes b read from path.
func Parse(path string, b []byte, key string, fileSize int64) (Recording, error) {
	r, err := Decode(b)
	if err != nil {
		return Recording{}, fmt.Errorf("load recording %s: %w", path, err)
	}
	if r.Key != key || r.FileSize != fileSize {
		return Recording{}, fmt.Errorf("load recording %s: %w: it is of key %s and a %d-byte mem-file, this mem-file is key %s, %d bytes",
			path, ErrStale, r.Key, r.FileSize, key, fileSize)
	}
	return r, nil
}
