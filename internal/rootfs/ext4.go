package rootfs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrTooSmall is returned by Grow for a size below the image's own.
var ErrTooSmall = errors.New("disk size smaller than the image")

// Ext4 geometry forkd builds with: 4 KiB blocks, 256-byte inodes.
const (
	blockSize = 4096
	inodeSize = 256
	mib       = 1 << 20
)

// Usage is what a tree needs on ext4.
type Usage struct {
	DataBytes int64 // blocks of file data, directories and long symlinks, holes excluded
	Inodes    int64 // distinct inodes (hardlinks counted once)
}

// Measure walks dir (not following symlinks) and totals what its content
// needs on ext4.
func Measure(dir string) (Usage, error) {
	var u Usage
	seen := map[[2]uint64]bool{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		st, ok := info.Sys().(*syscall.Stat_t)
		if !ok {
			return fmt.Errorf("measure %s: no stat", p)
		}
		key := [2]uint64{st.Dev, st.Ino}
		if seen[key] {
			return nil
		}
		seen[key] = true
		u.Inodes++
		switch {
		case info.Mode().IsRegular():
			// Allocated blocks on the host (holes excluded), in ext4 blocks.
			u.DataBytes += roundUp(st.Blocks*512, blockSize)
		case info.IsDir():
			u.DataBytes += roundUp(max(st.Size, blockSize), blockSize)
		case info.Mode()&fs.ModeSymlink != 0 && st.Size >= 60:
			u.DataBytes += blockSize // longer targets do not fit in the inode
		}
		// Extended attributes beyond the inode's spare room take a block;
		// count one for any inode that has them (cheap and safe).
		if n, _ := unix.Llistxattr(p, nil); n > 0 {
			u.DataBytes += blockSize
		}
		return nil
	})
	if err != nil {
		return Usage{}, fmt.Errorf("measure %s: %w", dir, err)
	}
	return u, nil
}

// ImageSize is the size of an ext4 image holding u with headroom bytes
// free: the data, one inode per file plus room for headroom's worth of new
// ones, the journal mke2fs will make for that size, and per-group metadata
// (bitmaps, descriptors, reserved descriptors for growing), rounded to MiB.
func ImageSize(u Usage, headroom int64) (size int64, inodes int64) {
	inodes = u.Inodes + headroom/16384 + 1024
	base := u.DataBytes + u.DataBytes/50 + headroom + inodes*inodeSize + 16*mib
	size = base + journalBytes(base)
	return roundUp(size, mib), inodes
}

// journalBytes is mke2fs's default journal size for a filesystem of size
// bytes (e2fsprogs' ext2fs_default_journal_size, in 4 KiB blocks).
func journalBytes(size int64) int64 {
	blocks := size / blockSize
	var j int64
	switch {
	case blocks < 2048:
		j = 0
	case blocks < 32768:
		j = 1024
	case blocks < 256*1024:
		j = 4096
	case blocks < 512*1024:
		j = 8192
	case blocks < 4096*1024:
		j = 16384
	case blocks < 8192*1024:
		j = 32768
	case blocks < 16384*1024:
		j = 65536
	case blocks < 32768*1024:
		j = 131072
	default:
		j = 262144
	}
	return j * blockSize
}

// MakeExt4 writes a new sparse ext4 image of size bytes at out (which must
// not exist) holding the tree at dir, with room for inodes inodes, and
// fsyncs it. mkfs.ext4 -d copies owners, modes, xattrs, hardlinks, device
// nodes and holes; nothing is mounted.
func MakeExt4(ctx context.Context, dir, out string, size, inodes int64) (err error) {
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("mkfs.ext4: %w", err)
	}
	defer func() {
		if err != nil {
			os.Remove(out)
		}
	}()
	if err := f.Truncate(size); err != nil {
		f.Close()
		return fmt.Errorf("mkfs.ext4: size %s: %w", out, err)
	}
	if err := f.Close(); err != nil {
		return err
	}
	// The file is new and sparse, so it reads as zeros: inode tables and
	// the journal need not be written (lazy init) and nothing needs a
	// discard. -m 0: a VM's root disk reserves no blocks for root.
	args := []string{"-q", "-F", "-t", "ext4", "-b", strconv.Itoa(blockSize), "-I", strconv.Itoa(inodeSize),
		"-N", strconv.FormatInt(inodes, 10), "-m", "0", "-L", "rootfs",
		"-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", "-d", dir, out}
	if err := run(ctx, "mkfs.ext4", args...); err != nil {
		return err
	}
	f, err = os.OpenFile(out, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// Grow enlarges the ext4 image at path (not mounted, never mounted since
// it was cloned) to size bytes and fsyncs it: the file is extended (sparse)
// and resize2fs grows the filesystem offline. A size below the current one
// is ErrTooSmall; an equal one changes nothing.
func Grow(ctx context.Context, path string, size int64) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("grow %s: %w", path, err)
	}
	switch {
	case size < st.Size():
		return fmt.Errorf("grow %s to %d bytes: %w (%d bytes)", path, size, ErrTooSmall, st.Size())
	case size == st.Size():
		return nil
	}
	if err := os.Truncate(path, size); err != nil {
		return fmt.Errorf("grow %s: %w", path, err)
	}
	if err := run(ctx, "resize2fs", path, strconv.FormatInt(size/1024, 10)+"K"); err != nil {
		return fmt.Errorf("grow %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// ErrNoSpace marks a build that ran out of room: on the host's filesystem
// (ENOSPC) or inside the image mkfs was making.
var ErrNoSpace = errors.New("no space left")

func run(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(out.String())
		if strings.Contains(msg, "No space left") || strings.Contains(msg, "Could not allocate block") {
			return fmt.Errorf("%s: %w: %s", name, ErrNoSpace, msg)
		}
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("%s is not installed (install e2fsprogs): %w", name, err)
		}
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, msg)
	}
	return nil
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }
