package testenv

import (
	"fmt"
	"hash/fnv"
	"path/filepath"
	"testing"
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

// NeedJail stops tb (skip, or fail under FORKD_TEST_REQUIRE=cgroup) when
// this host cannot jail VMMs: a jailer needs root and the cpu, memory and
// pids cgroup controllers. Every daemon and manager of the tests jails its
// VMMs, as forkd does by default. hostCgroups is jail.HostCgroups (passed
// in: testenv imports none of the packages it tests).
func NeedJail(tb testing.TB, hostCgroups func() (int, error)) {
	tb.Helper()
	NeedRoot(tb)
	if _, err := hostCgroups(); err != nil {
		Need(tb, Cgroup, err.Error())
	}
}
