package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/forkd/forkd/internal/capacity"
	"golang.org/x/sys/unix"
)

// hugePagesLock serializes the read-modify-write of the pool between test
// binaries running at once.
var hugePagesLock = filepath.Join(os.TempDir(), "forkd-test-hugepages.lock")

// HugePages grows the host's pool of 2 MiB pages by n for tb's duration and
// shrinks it by n again at cleanup. Each caller adds its own n, so tests in
// parallel binaries never take each other's pages. Pages still in use at
// cleanup (a VMM not yet reaped) become surplus and the kernel frees them
// when they are released. Without root or 2 MiB pages, or when the kernel
// cannot find n free ones, tb stops (Need Huge).
func HugePages(tb testing.TB, n int) {
	tb.Helper()
	NeedRoot(tb)
	if err := adjustHugePages(n); err != nil {
		Need(tb, Huge, err.Error())
		return
	}
	tb.Cleanup(func() {
		if err := adjustHugePages(-n); err != nil {
			tb.Errorf("give back %d huge pages: %v", n, err)
		}
	})
}

// adjustHugePages moves the pool by delta pages under the lock. Growing
// fails (and takes nothing) unless all delta pages were found.
func adjustHugePages(delta int) error {
	lock, err := os.OpenFile(hugePagesLock, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("huge pages lock: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("huge pages lock: %w", err)
	}
	before, err := readHugePages()
	if err != nil {
		return err
	}
	want := max(before+delta, 0)
	if err := os.WriteFile(capacity.NrHugePagesPath, []byte(strconv.Itoa(want)), 0); err != nil {
		return fmt.Errorf("set %s to %d: %w", capacity.NrHugePagesPath, want, err)
	}
	if delta <= 0 {
		return nil
	}
	got, err := readHugePages()
	if err != nil {
		return err
	}
	if got < want {
		// Give back what was found: a test that cannot run takes nothing.
		_ = os.WriteFile(capacity.NrHugePagesPath, []byte(strconv.Itoa(before)), 0)
		return fmt.Errorf("the kernel found %d of %d more 2 MiB pages (memory too fragmented or too small)", got-before, delta)
	}
	return nil
}

// readHugePages is the size of the host's pool of 2 MiB pages: the pool
// Firecracker (and forkd vmm) draws from when a guest's memory is backed by
// hugetlbfs.
func readHugePages() (int, error) {
	total, _, err := capacity.HugePagePool()
	return int(total), err
}
