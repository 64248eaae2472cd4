package instance

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"syscall"

	"github.com/forkd/forkd/internal/guestdir"
)

// cacheKey names the bytes of one vmstate + mem-file pair for the pager's
// page cache: a hash of both files' identity (device, inode, size, mtime).
// It is computed when the pair is written (standby, snapshot, live fork) and
// inherited by forks, which hardlink the same inode: all siblings of one
// snapshot share one cache key and so one set of cached pages (invariant 4
// of docs/architecture.md §3).
// Any rewrite of the files changes mtime (and the unshare guard the inode),
// so a stale key is never reused for new bytes.
func cacheKey(d guestdir.SnapDir) (string, error) {
	stamp, err := filesStamp(d, true)
	if err != nil {
		return "", fmt.Errorf("cache key: %w", err)
	}
	h := sha256.Sum256([]byte(stamp))
	return hex.EncodeToString(h[:])[:24], nil
}

// filesStamp names d's mem-file and vmstate as files: the inode, size and
// mtime of each (and their device, with dev), which any rewrite changes.
func filesStamp(d guestdir.SnapDir, dev bool) (string, error) {
	var b strings.Builder
	for _, p := range []string{d.Memory(), d.VMState()} {
		st, err := os.Stat(p)
		if err != nil {
			return "", err
		}
		sys, ok := st.Sys().(*syscall.Stat_t)
		if !ok {
			return "", fmt.Errorf("%s: no stat_t", p)
		}
		if dev {
			fmt.Fprintf(&b, "%d:", sys.Dev)
		}
		fmt.Fprintf(&b, "%d:%d:%d|", sys.Ino, st.Size(), st.ModTime().UnixNano())
	}
	return b.String(), nil
}
