package memfile

import (
	"errors"
	"fmt"
	"os"
)

// MergeDiff applies a diff layer onto base in place. See Options.MergeDiff.
func MergeDiff(base, diff string) error { return Options{}.MergeDiff(base, diff) }

// MergeDiff writes every data extent of diff (as SEEK_DATA/SEEK_HOLE report
// them) into base at the same offset, then fsyncs base; holes in diff leave
// base's bytes alone. This is how Firecracker's snapshot-editor rebases a
// Diff snapshot. diff is not modified. Both files must have the same size.
//
// It refuses (ErrShared) when base has other links: writing a shared inode
// would change the bytes every other link's reader sees. Run EnsureExclusive
// first. It also refuses a diff on a filesystem that cannot report holes,
// since every clean page would then read as a page of zeros to merge.
//
// A crash mid-merge leaves base partly merged; merging the same diff again
// gives the complete result (the merge is idempotent).
func (o Options) MergeDiff(base, diff string) error {
	b, err := os.OpenFile(base, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("merge %s into %s: %w", diff, base, err)
	}
	defer b.Close()
	// Never diff-write a mem-file another link names: unshare first (nlink > 1).
	// Checked on the open file, so a rename after the check cannot fool it.
	bst, err := b.Stat()
	if err != nil {
		return fmt.Errorf("merge %s into %s: %w", diff, base, err)
	}
	if n := nlink(bst); n > 1 {
		return fmt.Errorf("merge %s into %s: base has %d links: %w", diff, base, n, ErrShared)
	}
	return o.mergeInto(b, diff)
}

// mergeInto is MergeDiff without the shared-inode guard. Only the guard's
// twin test calls it directly.
func (o Options) mergeInto(b *os.File, diff string) error {
	base := b.Name()
	d, err := os.Open(diff)
	if err != nil {
		return fmt.Errorf("merge %s into %s: %w", diff, base, err)
	}
	defer d.Close()
	bst, err := b.Stat()
	if err != nil {
		return fmt.Errorf("merge %s into %s: %w", diff, base, err)
	}
	dst, err := d.Stat()
	if err != nil {
		return fmt.Errorf("merge %s into %s: %w", diff, base, err)
	}
	if dst.Size() != bst.Size() {
		return fmt.Errorf("merge %s into %s: diff is %d bytes, base %d: not a layer of this base", diff, base, dst.Size(), bst.Size())
	}
	// A diff is only meaningful through its holes: where the filesystem cannot
	// show them, every clean page would read as zeros to merge. Refuse.
	if err := checkReportsHoles(d, dst); err != nil {
		return fmt.Errorf("merge %s into %s: %w: a merge would overwrite clean pages with zeros", diff, base, err)
	}
	c := &rangeCopier{src: d, dst: b}
	err = dataExtents(d, dst.Size(), func(off, n int64) error {
		if err := c.copy(off, n); err != nil {
			return err
		}
		o.at(stepMerged)
		return nil
	})
	if err != nil {
		return fmt.Errorf("merge %s into %s: %w", diff, base, err)
	}
	if err := b.Sync(); err != nil {
		return fmt.Errorf("merge %s into %s: fsync: %w", diff, base, err)
	}
	return nil
}

// checkReportsHoles returns errNoSeekHole for a filesystem without
// SEEK_DATA/SEEK_HOLE, and for one whose SEEK_HOLE is the generic fallback
// (the whole file is one data extent) although the file is clearly sparse
// (far fewer blocks allocated than its size).
func checkReportsHoles(d *os.File, st os.FileInfo) error {
	size := st.Size()
	whole := false
	err := dataExtents(d, size, func(off, n int64) error {
		whole = off == 0 && n == size
		return errStop
	})
	if err != nil && !errors.Is(err, errStop) {
		return err
	}
	const slack = 1 << 20
	if whole && allocated(st)+slack < size {
		return fmt.Errorf("%w (one data extent reported for a file with %d of %d bytes allocated)", errNoSeekHole, allocated(st), size)
	}
	return nil
}

// errStop ends an extent walk early.
var errStop = errors.New("stop")
