package jail

import (
	"fmt"
	"io/fs"
	"path/filepath"
	"syscall"
)

// UnsealedLinks lists the regular files under root that have more than
// one link but are not sealed (root-owned, writable by nobody): forkd links
// an inode a second time only once no VMM can write it, so each entry is a
// shared inode a jailed VMM could write. For the checks of that rule.
func UnsealedLinks(root string) []string {
	var out []string
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		var st syscall.Stat_t
		if syscall.Lstat(p, &st) == nil && st.Nlink > 1 && (st.Uid != 0 || st.Gid != 0 || st.Mode&0o222 != 0) {
			out = append(out, fmt.Sprintf("%s (nlink %d, uid %d, mode %o)", p, st.Nlink, st.Uid, st.Mode&0o7777))
		}
		return nil
	})
	return out
}
