package image

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/rootfs"
)

// Phases of a pull, in order.
const (
	PhaseResolving = "resolving" // reading the manifest
	PhaseFetching  = "fetching"  // downloading and unpacking layers
	PhaseBuilding  = "building"  // mkfs.ext4
	PhaseDone      = "done"
)

// Progress is where a pull stands. Bytes count the layers' compressed
// (downloaded) bytes.
type Progress struct {
	Phase       string
	LayersDone  int
	LayersTotal int
	BytesDone   int64
	BytesTotal  int64
}

// RunConfig is what the image says to run: recorded, shown by inspect.
type RunConfig struct {
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
	Env        []string `json:"env,omitempty"`
	WorkingDir string   `json:"working_dir,omitempty"`
	User       string   `json:"user,omitempty"`
}

// built is what build leaves in a temp image dir besides rootfs.ext4.
type built struct {
	SizeBytes    int64     `json:"size_bytes"`
	DiskBytes    int64     `json:"disk_bytes"`
	ContentBytes int64     `json:"content_bytes"`
	Layers       int       `json:"layers"`
	Config       RunConfig `json:"config"`
}

// buildOptions are the knobs of one build.
type buildOptions struct {
	headroom        int64
	ignoreWhiteouts bool
	progress        func(Progress)
}

// build makes dir's rootfs.ext4 from src: each layer is downloaded and
// unpacked in one pass into dir's private tree (verified against its
// digest and its diff_id; a mismatch is ErrCorrupt), then mkfs.ext4 copies
// the tree into a sparse image sized to the content plus headroom, and the
// tree is removed. dir is a temp image dir the caller discards on error.
func build(ctx context.Context, src source, dir guestdir.ImageDir, o buildOptions) (built, error) {
	var b built
	layers, err := src.img.Layers()
	if err != nil {
		return b, classify(err)
	}
	cf, err := src.img.ConfigFile()
	if err != nil {
		return b, classify(err)
	}
	if len(cf.RootFS.DiffIDs) != len(layers) {
		return b, fmt.Errorf("%w: the config lists %d diff_ids for %d layers", ErrCorrupt, len(cf.RootFS.DiffIDs), len(layers))
	}
	b.Layers = len(layers)
	b.Config = RunConfig{Entrypoint: cf.Config.Entrypoint, Cmd: cf.Config.Cmd, Env: cf.Config.Env,
		WorkingDir: cf.Config.WorkingDir, User: cf.Config.User}
	p := Progress{Phase: PhaseFetching, LayersTotal: len(layers)}
	for _, l := range layers {
		n, err := l.Size()
		if err != nil {
			return b, classify(err)
		}
		p.BytesTotal += n
	}
	report := func() {
		if o.progress != nil {
			o.progress(p)
		}
	}
	report()

	if err := os.Mkdir(dir.Tree(), 0o700); err != nil {
		return b, err
	}
	tree, err := rootfs.OpenTree(dir.Tree(), rootfs.Options{IgnoreWhiteouts: o.ignoreWhiteouts})
	if err != nil {
		return b, err
	}
	defer tree.Close()
	for i, l := range layers {
		var done atomic.Int64
		stop, stopped := make(chan struct{}), make(chan struct{})
		go func(q Progress) { // report download progress while the layer streams
			defer close(stopped)
			t := time.NewTicker(progressEvery)
			defer t.Stop()
			base := q.BytesDone
			for {
				select {
				case <-stop:
					return
				case <-t.C:
					q.BytesDone = base + done.Load()
					if o.progress != nil {
						o.progress(q)
					}
				}
			}
		}(p)
		err := applyLayer(ctx, tree, l, cf.RootFS.DiffIDs[i], &done)
		close(stop)
		<-stopped
		if err != nil {
			return b, fmt.Errorf("layer %d of %d: %w", i+1, len(layers), err)
		}
		p.LayersDone++
		p.BytesDone += done.Load()
		report()
	}
	if err := tree.Finish(); err != nil {
		return b, err
	}

	p.Phase = PhaseBuilding
	report()
	u, err := rootfs.Measure(dir.Tree())
	if err != nil {
		return b, err
	}
	size, inodes := rootfs.ImageSize(u, o.headroom)
	if err := rootfs.MakeExt4(ctx, dir.Tree(), dir.Rootfs(), size, inodes); err != nil {
		return b, err
	}
	if err := os.RemoveAll(dir.Tree()); err != nil {
		return b, fmt.Errorf("remove the unpacked tree: %w", err)
	}
	st, err := os.Stat(dir.Rootfs())
	if err != nil {
		return b, err
	}
	b.SizeBytes, b.ContentBytes = st.Size(), u.DataBytes
	b.DiskBytes = allocated(st)
	return b, nil
}

// applyLayer streams one layer into the tree, counting compressed bytes in
// done and checking both digests once the stream is fully read.
func applyLayer(ctx context.Context, tree *rootfs.Tree, l v1.Layer, diffID v1.Hash, done *atomic.Int64) error {
	want, err := l.Digest()
	if err != nil {
		return classify(err)
	}
	rc, err := l.Compressed()
	if err != nil {
		return classify(err)
	}
	defer rc.Close()
	zsum := newHashReader(&countingReader{r: rc, n: done})
	br := bufio.NewReaderSize(zsum, 1<<20)
	plain, closeFn, err := decompress(br)
	if err != nil {
		return fmt.Errorf("%w: layer %s: %v", ErrCorrupt, want, err)
	}
	sum := newHashReader(plain)
	if _, err := tree.Apply(ctx, sum); err != nil {
		if rerr := classify(zsum.err); rerr != nil && errors.Is(rerr, ErrCorrupt) {
			return fmt.Errorf("layer %s: %w", want, rerr)
		}
		return err
	}
	// Read to the end (tar padding, the compressor's trailer), so the
	// digests cover every byte.
	if _, err := io.Copy(io.Discard, sum); err != nil {
		return fmt.Errorf("layer %s: %w", want, classify(err))
	}
	closeFn()
	if _, err := io.Copy(io.Discard, br); err != nil {
		return fmt.Errorf("layer %s: %w", want, classify(err))
	}
	if got := zsum.digest(); got != want.String() {
		return fmt.Errorf("%w: layer %s read back as %s", ErrCorrupt, want, got)
	}
	if got := sum.digest(); got != diffID.String() {
		return fmt.Errorf("%w: layer %s uncompresses to %s, but the config says %s", ErrCorrupt, want, got, diffID)
	}
	return nil
}

// progressEvery is how often a streaming layer reports its bytes.
const progressEvery = 200 * time.Millisecond

// allocated is the bytes a file allocates on disk.
func allocated(st os.FileInfo) int64 {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return s.Blocks * 512
	}
	return st.Size()
}

// decompress recognises gzip and zstd by their magic numbers; anything
// else is read as an uncompressed tar.
func decompress(br *bufio.Reader) (io.Reader, func(), error) {
	magic, _ := br.Peek(4)
	switch {
	case len(magic) >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		z, err := gzip.NewReader(br)
		if err != nil {
			return nil, nil, err
		}
		z.Multistream(true)
		return z, func() { z.Close() }, nil
	case len(magic) == 4 && magic[0] == 0x28 && magic[1] == 0xb5 && magic[2] == 0x2f && magic[3] == 0xfd:
		z, err := zstd.NewReader(br)
		if err != nil {
			return nil, nil, err
		}
		return z, z.Close, nil
	default:
		return br, func() {}, nil
	}
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n.Add(int64(n))
	return n, err
}

// hashReader hashes what passes through and keeps the first read error
// that is not EOF.
type hashReader struct {
	r   io.Reader
	h   hash.Hash
	err error
}

func newHashReader(r io.Reader) *hashReader { return &hashReader{r: r, h: sha256.New()} }

func (h *hashReader) Read(b []byte) (int, error) {
	n, err := h.r.Read(b)
	h.h.Write(b[:n])
	if err != nil && err != io.EOF && h.err == nil {
		h.err = err
	}
	return n, err
}

func (h *hashReader) digest() string { return "sha256:" + hex.EncodeToString(h.h.Sum(nil)) }
