package testenv

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// EvictPageCache writes back path's dirty pages and asks the kernel to
// drop its cached pages (FADV_DONTNEED), so that the next read of it goes
// to the disk: a cold read, as after a reboot or under memory pressure.
// Pages a process maps stay cached; a file on tmpfs stays whole. A test
// that needs its pages gone checks that they are (prefetch.OpenResidency).
func EvictPageCache(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("evict %s from the page cache: %w", path, err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		return fmt.Errorf("evict %s from the page cache: %w", path, err)
	}
	return nil
}
