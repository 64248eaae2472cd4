package prefetch

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func testRecording(pages ...uint64) Recording {
	return Recording{Key: "0123456789abcdef01234567", PageSize: 4096, FileSize: 1 << 30, Source: SourceUffd,
		Window: 5 * time.Second, RecordedAt: time.Unix(1700000000, 42), Pages: pages}
}

func TestRecordingRoundTripsInOrder(t *testing.T) {
	many := make([]uint64, 0, 20000)
	for i := range uint64(20000) {
		many = append(many, (i*7919)%(1<<18)) // a scattered order, no repeats
	}
	tests := []struct {
		name  string
		pages []uint64
	}{
		{"empty", nil},
		{"one page", []uint64{5}},
		{"descending", []uint64{9, 8, 7, 1, 0}},
		{"far apart", []uint64{0, 1<<18 - 1, 3}},
		{"scattered", many},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := testRecording(tt.pages...)
			b, err := Encode(r)
			if err != nil {
				t.Fatal(err)
			}
			got, err := Decode(b)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got.Pages, r.Pages) && len(r.Pages)+len(got.Pages) > 0 {
				t.Fatalf("pages after a round trip differ: got %d pages, want %d (first %v vs %v)", len(got.Pages), len(r.Pages), head(got.Pages), head(r.Pages))
			}
			if got.Key != r.Key || got.PageSize != r.PageSize || got.FileSize != r.FileSize || got.Source != r.Source ||
				got.Window != r.Window || !got.RecordedAt.Equal(r.RecordedAt) {
				t.Fatalf("header after a round trip = %+v, want %+v", got, r)
			}
		})
	}
	if b, _ := Encode(testRecording(many...)); len(b) > 3*len(many) {
		t.Errorf("%d scattered pages take %d bytes, want under 3 per page", len(many), len(b))
	}
}

func head(p []uint64) []uint64 { return p[:min(len(p), 5)] }

// reseal recomputes the checksum after a test edits the body, so the
// decoder's other checks are the ones tested.
func reseal(b []byte) []byte {
	body := b[:len(b)-4]
	return binary.LittleEndian.AppendUint32(slices.Clone(body), crc32.Checksum(body, crcTable()))
}

func TestDecodeRefusesDamagedRecordings(t *testing.T) {
	good, err := Encode(testRecording(1, 2, 3))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Decode(good); err != nil {
		t.Fatalf("the undamaged file: %v", err)
	}
	tests := []struct {
		name, want string
		edit       func([]byte) []byte
	}{
		{"a flipped page byte", "checksum", func(b []byte) []byte { b[len(b)-5] ^= 1; return b }},
		{"truncated", "checksum", func(b []byte) []byte { return b[:len(b)-2] }},
		{"too short", "bad magic", func(b []byte) []byte { return b[:10] }},
		{"not a recording", "bad magic", func(b []byte) []byte { copy(b, "FORKDZS1"); return b }},
		{"a newer format", "format version 2", func(b []byte) []byte { b[8] = 2; return reseal(b) }},
		{"an unknown source", "source 9", func(b []byte) []byte { b[40] = 9; return reseal(b) }},
		{"a page recorded twice", "recorded twice", func(b []byte) []byte {
			r := testRecording(1, 2, 3)
			r.Pages[2] = 1 // Encode refuses it, so build it by hand
			r.Pages = r.Pages[:2]
			out, _ := Encode(r)
			out = out[:len(out)-4]
			binary.LittleEndian.PutUint32(out[44:], 3)
			out = binary.AppendVarint(out, -1)
			return binary.LittleEndian.AppendUint32(out, crc32.Checksum(out, crcTable()))
		}},
		{"a page past the end of the file", "past the end", func(b []byte) []byte {
			binary.LittleEndian.PutUint64(b[16:], 2*4096) // the file shrinks to 2 pages
			return reseal(b)
		}},
		{"trailing bytes", "after the last page", func(b []byte) []byte {
			body := append(slices.Clone(b[:len(b)-4]), 0)
			return binary.LittleEndian.AppendUint32(body, crc32.Checksum(body, crcTable()))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Decode(tt.edit(slices.Clone(good)))
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Decode = %v, want ErrCorrupt mentioning %q", err, tt.want)
			}
		})
	}
}

func TestEncodeRefusesBadRecordings(t *testing.T) {
	tests := []struct {
		name string
		edit func(*Recording)
	}{
		{"no key", func(r *Recording) { r.Key = "" }},
		{"a key that is not hex", func(r *Recording) { r.Key = "../x" }},
		{"page size 3000", func(r *Recording) { r.PageSize = 3000 }},
		{"a duplicate", func(r *Recording) { r.Pages = []uint64{4, 4} }},
		{"a page past the end", func(r *Recording) { r.Pages = []uint64{1 << 18} }},
		{"no source", func(r *Recording) { r.Source = "" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := testRecording(1)
			tt.edit(&r)
			if _, err := Encode(r); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Encode = %v, want ErrCorrupt", err)
			}
		})
	}
}

// TestLoadNeverReturnsAStaleRecording: a recording describes one cache
// key's bytes; under another key or mem-file size it is refused. The twin
// is the matching key, which loads.
func TestLoadNeverReturnsAStaleRecording(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "rec.ws")
	r := testRecording(3, 1, 2)
	if err := Write(path, r); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("Write left %d files, want only the recording", len(ents))
	}
	tests := []struct {
		name string
		key  string
		size int64
		want error
	}{
		{"the same key and size (twin)", r.Key, r.FileSize, nil},
		{"another key", "ffffffffffffffffffffffff", r.FileSize, ErrStale},
		{"another size", r.Key, r.FileSize + 4096, ErrStale},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Load(path, tt.key, tt.size)
			if !errors.Is(err, tt.want) || (tt.want == nil) != (err == nil) {
				t.Fatalf("Load = %v, want %v", err, tt.want)
			}
			if err == nil && !slices.Equal(got.Pages, r.Pages) {
				t.Fatalf("pages %v, want %v", got.Pages, r.Pages)
			}
		})
	}
	if _, err := Load(filepath.Join(dir, "none.ws"), r.Key, r.FileSize); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Load of a missing file = %v, want ErrNotExist", err)
	}
}
