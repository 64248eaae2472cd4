// Package testfs is what tests use to get real loopback filesystems (ext4,
// XFS with reflink, btrfs), built on internal/loopfs: a test asks for a
// kind, and where this machine cannot make it the test skips with the reason
// through internal/testenv, or fails when FORKD_TEST_REQUIRE names the
// missing requirement (CI: root, loop, xfs, btrfs). It imports "testing" and
// must never be linked into the forkd binary.
package testfs

import (
	"errors"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/forkd/forkd/internal/loopfs"
	"github.com/forkd/forkd/internal/testenv"
)

// Kind is a filesystem kind (loopfs.Kind).
type Kind = loopfs.Kind

const (
	Ext4  = loopfs.Ext4
	XFS   = loopfs.XFS
	Btrfs = loopfs.Btrfs
)

// Kinds lists every filesystem tests should cover, in a stable order.
var Kinds = loopfs.Kinds

// DefaultSize is the image size of Pool's filesystems (loopfs.DefaultSize).
const DefaultSize = loopfs.DefaultSize

// FS is one mounted loopback filesystem.
type FS struct{ *loopfs.FS }

// Need stops tb unless loopback filesystems of kind can be made here: a skip
// with the reason, or a failure when FORKD_TEST_REQUIRE names what is
// missing (root; loop for loop devices and ext4; xfs; btrfs).
func Need(tb testing.TB, kind Kind) {
	tb.Helper()
	lack, why := loopfs.Missing(kind)
	switch lack {
	case 0:
	case loopfs.LackRoot:
		testenv.Need(tb, testenv.Root, why)
	case loopfs.LackMkfs:
		testenv.Need(tb, requirement(kind), why)
	default:
		testenv.Need(tb, testenv.Loop, why)
	}
}

// requirement is the testenv key of kind's mkfs tool.
func requirement(kind Kind) string {
	switch kind {
	case XFS:
		return testenv.XFS
	case Btrfs:
		return testenv.Btrfs
	}
	return testenv.Loop
}

// Mount makes a loopback filesystem of kind and size bytes for tb (Need
// first) and removes it when tb ends; a failure to make it fails tb.
func Mount(tb testing.TB, kind Kind, size int64) *FS {
	tb.Helper()
	Need(tb, kind)
	fs, err := loopfs.Mount(kind, size)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := fs.Close(); err != nil {
			tb.Error(err)
		}
	})
	return &FS{fs}
}

// TempDir makes a fresh directory on the filesystem for one test and removes
// it when the test ends.
func (f *FS) TempDir(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp(f.Dir, strings.NewReplacer("/", "_", " ", "_").Replace(tb.Name())+"-")
	if err != nil {
		tb.Fatalf("testfs: temp dir on %s: %v", f.Kind, err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// Pool makes each kind of filesystem at most once per test binary and shares
// it among tests (making images is the slow part). Create it in TestMain and
// Close it after m.Run.
type Pool struct {
	size int64

	mu   sync.Mutex // guards fss and errs
	fss  map[Kind]*FS
	errs map[Kind]error
}

// NewPool returns a pool whose filesystems are size bytes (DefaultSize if 0).
func NewPool(size int64) *Pool {
	if size == 0 {
		size = DefaultSize
	}
	return &Pool{size: size, fss: map[Kind]*FS{}, errs: map[Kind]error{}}
}

// Get returns the pool's filesystem of kind, making it on first use. It
// stops tb through Need when loopback filesystems cannot be made here, and
// fails it when making one fails for another reason.
func (p *Pool) Get(tb testing.TB, kind Kind) *FS {
	tb.Helper()
	Need(tb, kind)
	p.mu.Lock()
	defer p.mu.Unlock()
	if fs, ok := p.fss[kind]; ok {
		return fs
	}
	if err, ok := p.errs[kind]; ok {
		tb.Fatalf("testfs: %s unavailable: %v", kind, err)
	}
	fs, err := loopfs.Mount(kind, p.size)
	if err != nil {
		p.errs[kind] = err
		tb.Fatalf("testfs: %v", err)
	}
	p.fss[kind] = &FS{fs}
	return p.fss[kind]
}

// Close unmounts and removes every filesystem the pool made.
func (p *Pool) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	var errs []error
	for kind, fs := range p.fss {
		if err := fs.Close(); err != nil {
			errs = append(errs, err)
		}
		delete(p.fss, kind)
	}
	return errors.Join(errs...)
}
