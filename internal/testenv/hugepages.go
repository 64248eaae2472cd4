package testenv

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/forkd/forkd/internal/capacity"
	"golang.org/x/sys/unix"
)

// hugePagesLock serializes the read-modify-write of the pool between test
// binaries running at once.
var hugePagesLock = filepath.Join(os.TempDir(), "forkd-test-hugepages.lock")

// hugePagesLedger holds one file per grant not yet given back, named
// <pid>-<seq> of the test process that holds it and holding its page
// count. A test binary killed by -timeout runs no cleanup; the next grant
// or give-back on the host finds its entries by their dead pid and gives
// their pages back.
var hugePagesLedger = filepath.Join(os.TempDir(), "forkd-test-hugepages.d")

var grantSeq atomic.Uint64

// HugePages grows the host's pool of 2 MiB pages by n for tb's duration and
// shrinks it by n again at cleanup. Each caller adds its own n, so tests in
// parallel binaries never take each other's pages. Pages still in use at
// cleanup (a VMM not yet reaped) become surplus and the kernel frees them
// when they are released. Without root or 2 MiB pages, or when the kernel
// cannot find n free ones, tb stops (Need Huge).
func HugePages(tb testing.TB, n int) {
	tb.Helper()
	NeedRoot(tb)
	grant, err := growHugePages(n)
	if err != nil {
		Need(tb, Huge, err.Error())
		return
	}
	tb.Cleanup(func() {
		if err := shrinkHugePages(grant, n); err != nil {
			tb.Errorf("give back %d huge pages: %v", n, err)
		}
	})
}

// growHugePages grows the pool by n and returns the grant's ledger entry.
// It fails (and takes nothing) unless all n pages were found.
func growHugePages(n int) (string, error) {
	grant := filepath.Join(hugePagesLedger, fmt.Sprintf("%d-%d", os.Getpid(), grantSeq.Add(1)))
	err := withPool(func(before int) error {
		if err := setHugePages(before + n); err != nil {
			return err
		}
		got, err := readHugePages()
		if err != nil {
			return err
		}
		if got < before+n {
			// Give back what was found: a test that cannot run takes nothing.
			_ = setHugePages(before)
			return fmt.Errorf("the kernel found %d of %d more 2 MiB pages (memory too fragmented or too small)", got-before, n)
		}
		if err := os.WriteFile(grant, []byte(strconv.Itoa(n)), 0o600); err != nil {
			_ = setHugePages(before)
			return fmt.Errorf("huge pages ledger: %w", err)
		}
		return nil
	})
	return grant, err
}

// shrinkHugePages gives back grant's n pages and forgets it.
func shrinkHugePages(grant string, n int) error {
	return withPool(func(before int) error {
		if err := setHugePages(max(before-n, 0)); err != nil {
			return err
		}
		return os.Remove(grant)
	})
}

// withPool runs f with the pool's size under the lock, after giving back
// the grants of test processes that are gone.
func withPool(f func(pool int) error) error {
	unlock, err := lockPool()
	if err != nil {
		return err
	}
	defer unlock()
	if err := reclaimHugePages(); err != nil {
		return err
	}
	before, err := readHugePages()
	if err != nil {
		return err
	}
	return f(before)
}

// lockPool takes the pool's lock, shared by every test binary.
func lockPool() (unlock func(), err error) {
	if err := os.MkdirAll(hugePagesLedger, 0o700); err != nil {
		return nil, fmt.Errorf("huge pages ledger: %w", err)
	}
	lock, err := os.OpenFile(hugePagesLock, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("huge pages lock: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		lock.Close()
		return nil, fmt.Errorf("huge pages lock: %w", err)
	}
	return func() { lock.Close() }, nil
}

// reclaimHugePages gives back the pages of every grant whose process is
// gone. A pid reused since only keeps its grant a while longer: a grant
// of a live process is never taken.
func reclaimHugePages() error {
	entries, err := os.ReadDir(hugePagesLedger)
	if err != nil {
		return fmt.Errorf("huge pages ledger: %w", err)
	}
	for _, e := range entries {
		pid, _, ok := strings.Cut(e.Name(), "-")
		p, perr := strconv.Atoi(pid)
		if !ok || perr != nil || p <= 0 || !gone(p) {
			continue
		}
		path := filepath.Join(hugePagesLedger, e.Name())
		b, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("huge pages ledger: %w", err)
		}
		n, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			return fmt.Errorf("huge pages ledger %s: %w", path, err)
		}
		pool, err := readHugePages()
		if err != nil {
			return err
		}
		if err := setHugePages(max(pool-n, 0)); err != nil {
			return err
		}
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("huge pages ledger: %w", err)
		}
	}
	return nil
}

// gone: pid has exited, or is a zombie nobody reaps (an orphan's parent
// here may be an init that never reaps).
func gone(pid int) bool {
	if errors.Is(unix.Kill(pid, 0), unix.ESRCH) {
		return true
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return errors.Is(err, os.ErrNotExist)
	}
	// pid (comm) state ...: comm may hold spaces and parentheses.
	i := strings.LastIndexByte(string(stat), ')')
	return i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z'
}

func setHugePages(n int) error {
	if err := os.WriteFile(capacity.NrHugePagesPath, []byte(strconv.Itoa(n)), 0); err != nil {
		return fmt.Errorf("set %s to %d: %w", capacity.NrHugePagesPath, n, err)
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
