// Package nettest gives tests a network namespace of their own to run a
// daemon (or a network.Host) in, so that nothing a networking test does
// can reach the host's network: every link, route and rule lives in
// namespaces the test made, and its pools come from 198.18.0.0/15, the
// range RFC 2544 sets aside for benchmarking.
package nettest

import (
	"crypto/rand"
	"encoding/hex"
	"testing"

	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/testenv"
)

// Pool is the address pool networking tests give their daemons: inside
// RFC 2544's 198.18.0.0/15, and only ever routed inside a test's namespace.
const Pool = "198.18.0.0/24"

// Namespace creates a named network namespace for one test (name
// "forkdtest-<pid>-<random>", testenv.TestNamespaceName, mounted under
// /var/run/netns: testenv.Main knows its own by the pid) with its loopback up,
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
	name := testenv.TestNamespaceName(hex.EncodeToString(b[:]))
	path, err := network.NewNamespace(name)
	if err != nil {
		testenv.Need(tb, testenv.Netns, "cannot create a network namespace: "+err.Error())
	}
	tb.Cleanup(func() { network.RemoveNamespace(path) })
	return path
}
