package testenv

import (
	"fmt"
	"hash/fnv"
	"path/filepath"
)

// JailUIDRange is a jail_uid_range of 256 uids for a test daemon on
// dataDir: derived from the data dir, so the daemons of tests running side
// by side (in one package or in other engineers' packages) do not hand the
// same uid to two VMMs, as one daemon never does. Production daemons use
// the default range; one runs per host.
func JailUIDRange(dataDir string) string {
	h := fnv.New32a()
	h.Write([]byte(filepath.Clean(dataDir)))
	first := 2_000_000 + int(h.Sum32()%60_000)*256
	return fmt.Sprintf("%d-%d", first, first+255)
}
