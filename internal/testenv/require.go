package testenv

import (
	"os"
	"strings"
	"testing"
)

// Keys of the requirements a test may name. The list is closed so that a
// typo in FORKD_TEST_REQUIRE or in a test is caught (Required panics).
const (
	Root   = "root"      // euid 0
	Loop   = "loop"      // loop devices (/dev/loop-control, losetup, mount)
	Uffd   = "uffd"      // userfaultfd
	XFS    = "xfs"       // mkfs.xfs with reflink
	Btrfs  = "btrfs"     // mkfs.btrfs
	Netns  = "netns"     // network namespaces, veth, TAP and nf_tables
	Cgroup = "cgroup"    // writable cgroup controllers (memory, cpu, pids)
	KVM    = "kvm"       // /dev/kvm with firecracker and jailer binaries
	Huge   = "hugepages" // a pool of 2 MiB pages the tests may grow (root)
)

var known = map[string]bool{Root: true, Loop: true, Uffd: true, XFS: true, Btrfs: true, Netns: true, Cgroup: true, KVM: true, Huge: true}

// EnvRequire names the environment variable listing the requirements whose
// absence fails a test instead of skipping it.
const EnvRequire = "FORKD_TEST_REQUIRE"

// Required reports whether key is listed in FORKD_TEST_REQUIRE (or it says
// "all").
func Required(key string) bool {
	if !known[key] {
		panic("testenv: unknown requirement " + key)
	}
	for _, k := range strings.Split(os.Getenv(EnvRequire), ",") {
		k = strings.TrimSpace(k)
		if k == key || k == "all" {
			return true
		}
	}
	return false
}

// Need stops tb when requirement key is missing (why != ""): it skips with
// the reason, or fails when FORKD_TEST_REQUIRE names key. It returns only
// when why is empty.
func Need(tb testing.TB, key, why string) {
	tb.Helper()
	if why == "" {
		return
	}
	if Required(key) {
		tb.Fatalf("required by %s=%q but missing: %s: %s", EnvRequire, os.Getenv(EnvRequire), key, why)
		return
	}
	tb.Skipf("SKIP (needs %s): %s", key, why)
}

// NeedRoot is Need(tb, Root, …) for a test that must run as root.
func NeedRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		Need(tb, Root, "not running as root")
	}
}
