// Package nettest gives tests a network namespace of their own to run a
// daemon (or a network.Host) in, so that nothing a networking test does
// can reach the host's network: every link, route and rule lives in
// namespaces the test made, and its pools come from 198.18.0.0/15, the
// range RFC 2544 sets aside for benchmarking.
package nettest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/testenv"
)

// Pool is the address pool networking tests give their daemons: inside
// RFC 2544's 198.18.0.0/15, and only ever routed inside a test's namespace.
const Pool = "198.18.0.0/24"

// Namespace creates a named network namespace for one test (name
// "forkdtest-<random>", mounted under /var/run/netns) with its loopback up,
// and removes it when the test ends. It skips (or fails, under
// FORKD_TEST_REQUIRE=netns) where namespaces cannot be made.
func Namespace(tb testing.TB) string {
	tb.Helper()
	testenv.NeedRoot(tb)
	if err := network.Check(); err != nil {
		testenv.Need(tb, testenv.Netns, err.Error())
	}
	var b [4]byte
	rand.Read(b[:])
	name := "forkdtest-" + hex.EncodeToString(b[:])
	path, err := create(name)
	if err != nil {
		testenv.Need(tb, testenv.Netns, "cannot create a network namespace: "+err.Error())
	}
	tb.Cleanup(func() {
		unix.Unmount(path, unix.MNT_DETACH)
		os.Remove(path)
	})
	return path
}

func create(name string) (string, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return "", err
	}
	defer orig.Close()
	ns, err := netns.NewNamed(name)
	if err != nil {
		netns.Set(orig)
		os.Remove("/var/run/netns/" + name)
		return "", err
	}
	defer ns.Close()
	lerr := netlink.LinkSetUp(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: 1}})
	if err := netns.Set(orig); err != nil {
		// Never unlock a thread left in the test's namespace.
		runtime.LockOSThread()
		return "", fmt.Errorf("return to the original namespace: %w", err)
	}
	path := "/var/run/netns/" + name
	if lerr != nil {
		unix.Unmount(path, unix.MNT_DETACH)
		os.Remove(path)
		return "", fmt.Errorf("lo up: %w", lerr)
	}
	return path, nil
}
