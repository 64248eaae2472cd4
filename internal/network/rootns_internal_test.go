package network

import (
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/testenv"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// testNamespace makes a named namespace for one test and removes it after.
func testNamespace(t *testing.T) string {
	t.Helper()
	testenv.NeedRoot(t)
	path, err := NewNamespace(testenv.TestNamespaceName(randHex(t)))
	if err != nil {
		testenv.Need(t, testenv.Netns, "cannot create a network namespace: "+err.Error())
	}
	t.Cleanup(func() { RemoveNamespace(path) })
	return path
}

// TestEnsureRefusesAStaleDaemonHandle: if the descriptor a Host holds on
// its daemon's namespace comes to name another namespace (closed, and its
// number reused), Ensure refuses instead of moving a VM's host veth there.
// The twin shows the same Host makes the network once its handle is right.
func TestEnsureRefusesAStaleDaemonHandle(t *testing.T) {
	daemonNS, otherNS := testNamespace(t), testNamespace(t)
	cfg, err := ParseConfig("198.18.0.0/24", DefaultGuestCIDR, DefaultGuestMAC, false, randHex(t)[:6])
	if err != nil {
		t.Fatal(err)
	}
	var h *Host
	if err := Do(daemonNS, func() (err error) { h, err = New(cfg); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Remove(0); h.Close() })

	// Keep the daemon's handle aside and make its number name otherNS.
	saved, err := unix.Dup(int(h.daemon))
	if err != nil {
		t.Fatal(err)
	}
	other, err := netns.GetFromPath(otherNS)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Dup3(int(other), int(h.daemon), unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	other.Close()
	err = h.Ensure(0)
	if err == nil || !strings.Contains(err.Error(), "no longer valid") {
		t.Errorf("Ensure through a handle naming another namespace: %v, want a refusal", err)
	}
	if err := Do(otherNS, func() error {
		l, err := netlink.LinkByName(cfg.HostVeth(0))
		if err == nil {
			t.Errorf("host veth %s was made in the namespace the stale handle names (index %d)", cfg.HostVeth(0), l.Attrs().Index)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	// The twin: the right namespace behind the handle again.
	if err := unix.Dup3(saved, int(h.daemon), unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	unix.Close(saved)
	if err := h.Ensure(0); err != nil {
		t.Fatalf("Ensure with the daemon's own handle: %v", err)
	}
	if !h.Complete(0) {
		t.Error("Complete = false after Ensure")
	}
}
