package instance

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
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
	h := sha256.New()
	for _, p := range []string{d.Memory(), d.VMState()} {
		st, err := os.Stat(p)
		if err != nil {
			return "", fmt.Errorf("cache key: %w", err)
		}
		sys, ok := st.Sys().(*syscall.Stat_t)
		if !ok {
			return "", fmt.Errorf("cache key: %s: no stat_t", p)
		}
		fmt.Fprintf(h, "%d:%d:%d:%d|", sys.Dev, sys.Ino, st.Size(), st.ModTime().UnixNano())
	}
	return hex.EncodeToString(h.Sum(nil))[:24], nil
}
