package memfile

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// errNoSeekHole means the filesystem does not implement SEEK_DATA/SEEK_HOLE.
var errNoSeekHole = errors.New("filesystem does not support SEEK_DATA/SEEK_HOLE")

// dataExtents calls fn for each data extent [off, off+n) of f, in order, as
// reported by SEEK_DATA/SEEK_HOLE. It never reads the bytes: a range the
// filesystem reports as data is data, zeros or not. It returns errNoSeekHole
// (before calling fn) when the filesystem cannot report holes.
func dataExtents(f *os.File, size int64, fn func(off, n int64) error) error {
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // no data past off: the rest is a hole
		}
		if err != nil {
			if off == 0 && (errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP)) {
				return errNoSeekHole
			}
			return fmt.Errorf("seek data at %d: %w", off, err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek hole at %d: %w", data, err)
		}
		hole = min(hole, size)
		if hole <= data {
			return nil
		}
		if err := fn(data, hole-data); err != nil {
			return err
		}
		off = hole
	}
	return nil
}

// rangeCopier copies byte ranges between two files at the same offsets. It
// uses copy_file_range (which reflinks ranges on XFS/btrfs) and switches to
// pread/pwrite for good once the kernel refuses it (EXDEV across filesystems
// on older kernels, EINVAL/ENOSYS/EOPNOTSUPP elsewhere).
type rangeCopier struct {
	src, dst *os.File
	noCFR    bool
	buf      []byte
}

const copyBufSize = 1 << 20

func (c *rangeCopier) copy(off, n int64) error {
	sfd, dfd := int(c.src.Fd()), int(c.dst.Fd())
	for n > 0 {
		if !c.noCFR {
			roff, woff := off, off
			got, err := unix.CopyFileRange(sfd, &roff, dfd, &woff, int(min(n, 1<<30)), 0)
			switch {
			case err == nil && got > 0:
				off += int64(got)
				n -= int64(got)
				continue
			case err == nil:
				return fmt.Errorf("copy range at %d: source ended early (file shrank?)", off)
			case errors.Is(err, unix.EINTR):
				continue
			case errors.Is(err, unix.EXDEV), errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOSYS),
				errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.EBADF):
				c.noCFR = true
				continue
			default:
				return fmt.Errorf("copy_file_range at %d: %w", off, err)
			}
		}
		if c.buf == nil {
			c.buf = make([]byte, copyBufSize)
		}
		chunk := c.buf[:min(n, int64(len(c.buf)))]
		got, err := unix.Pread(sfd, chunk, off)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("pread at %d: %w", off, err)
		}
		if got == 0 {
			return fmt.Errorf("pread at %d: source ended early (file shrank?)", off)
		}
		if err := pwriteAll(dfd, chunk[:got], off); err != nil {
			return err
		}
		off += int64(got)
		n -= int64(got)
	}
	return nil
}

func pwriteAll(fd int, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pwrite(fd, p, off)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("pwrite at %d: %w", off, err)
		}
		p = p[n:]
		off += int64(n)
	}
	return nil
}
