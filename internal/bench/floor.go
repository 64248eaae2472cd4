package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// floorProbe measures the physical limit a fork is held to: one link() of a
// file plus an fsync of the directory holding the new name, on the
// filesystem the daemon's data dir lives on. A durable fork cannot be
// cheaper than that (it makes at least one new name durable), so a fork's
// latency is reported as a multiple of it.
type floorProbe struct {
	dir string // a directory of its own on the measured filesystem
	src string // the file every sample links
	n   int
}

// newFloorProbe makes a probe directory under parent (the data dir's
// filesystem) with one small file to link.
func newFloorProbe(parent string) (*floorProbe, error) {
	dir, err := os.MkdirTemp(parent, "floor-")
	if err != nil {
		return nil, fmt.Errorf("link floor: %w", err)
	}
	src := filepath.Join(dir, "src")
	if err := os.WriteFile(src, make([]byte, 4096), 0o600); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("link floor: %w", err)
	}
	return &floorProbe{dir: dir, src: src}, nil
}

// sample times one link() + fsync(dir). The new name is removed afterwards,
// untimed, so the directory does not grow across samples.
func (p *floorProbe) sample() (time.Duration, error) {
	p.n++
	dst := filepath.Join(p.dir, fmt.Sprintf("l%d", p.n))
	d, err := os.Open(p.dir)
	if err != nil {
		return 0, fmt.Errorf("link floor: %w", err)
	}
	defer d.Close()
	t0 := time.Now()
	if err := unix.Link(p.src, dst); err != nil {
		return 0, fmt.Errorf("link floor: link: %w", err)
	}
	if err := d.Sync(); err != nil {
		return 0, fmt.Errorf("link floor: fsync dir: %w", err)
	}
	took := time.Since(t0)
	if err := os.Remove(dst); err != nil {
		return 0, fmt.Errorf("link floor: %w", err)
	}
	return took, nil
}

// Close removes the probe directory.
func (p *floorProbe) Close() error { return os.RemoveAll(p.dir) }
