package memfile

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// ReflinkProbePrefix begins the name of CanReflink's temp dir. A crash or a
// power cut during (or soon after) a probe can leave one behind; the
// daemon's reconciler removes them.
const ReflinkProbePrefix = ".reflink-probe-"

// CanReflink reports whether files in dir can be cloned with FICLONE: it
// clones a small probe file in a temp dir under dir and removes both. Where
// it cannot (ext4, tmpfs), every Clone is a copy, and the unshare guard
// copies a whole mem-file where it would otherwise share its blocks.
func CanReflink(dir string) (bool, error) {
	probe, err := os.MkdirTemp(dir, ReflinkProbePrefix)
	if err != nil {
		return false, fmt.Errorf("reflink probe in %s: %w", dir, err)
	}
	defer os.RemoveAll(probe)
	a := filepath.Join(probe, "a")
	if err := os.WriteFile(a, []byte("forkd reflink probe\n"), 0o600); err != nil {
		return false, fmt.Errorf("reflink probe in %s: %w", dir, err)
	}
	mode, err := Clone(a, filepath.Join(probe, "b"))
	if err != nil {
		return false, fmt.Errorf("reflink probe in %s: %w", dir, err)
	}
	return mode == ModeReflink, nil
}

// FilesystemName names the filesystem holding path ("ext4", "xfs",
// "btrfs", "tmpfs", "overlay", else its magic number in hex).
func FilesystemName(path string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return "unknown"
	}
	switch uint32(st.Type) {
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlay"
	}
	return fmt.Sprintf("0x%x", uint32(st.Type))
}
