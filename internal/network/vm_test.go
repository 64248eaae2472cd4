package network_test

import (
	"crypto/rand"
	"encoding/hex"
	"net/netip"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/network/nettest"
)

// testHost opens a Host whose daemon namespace is a fresh test namespace,
// with a random tag, and removes every slot it made when the test ends.
func testHost(tb testing.TB, egress bool) (*network.Host, string) {
	tb.Helper()
	daemonNS := nettest.Namespace(tb)
	var b [3]byte
	rand.Read(b[:])
	cfg, err := network.ParseConfig(nettest.Pool, network.DefaultGuestCIDR, network.DefaultGuestMAC, egress, hex.EncodeToString(b[:]))
	if err != nil {
		tb.Fatal(err)
	}
	var h *network.Host
	if err := network.Do(daemonNS, func() (err error) { h, err = network.New(cfg); return err }); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		present, _ := h.Present()
		for s := range present {
			h.Remove(s)
		}
		h.Close()
	})
	return h, daemonNS
}

// BenchmarkEnsure measures making one VM's network from nothing
// (namespace, TAP, veth, addresses, routes, NAT table), in a row of fresh
// slots (removals, whose asynchronous namespace cleanup competes for the
// kernel's rtnl lock, happen outside the timed loop).
func BenchmarkEnsure(b *testing.B) {
	h, _ := testHost(b, false)
	for i := 0; i < b.N; i++ {
		if err := h.Ensure(i); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	for i := 0; i < b.N; i++ {
		h.Remove(i)
	}
}

// BenchmarkRemove measures removing one VM's network.
func BenchmarkRemove(b *testing.B) {
	h, _ := testHost(b, false)
	for i := 0; i < b.N; i++ {
		if err := h.Ensure(i); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := h.Remove(i); err != nil {
			b.Fatal(err)
		}
	}
}

// TestEnsureBuildsTheVMNetwork checks every kernel object of one VM's
// network, and that the names fit the kernel's limits.
func TestEnsureBuildsTheVMNetwork(t *testing.T) {
	h, daemonNS := testHost(t, false)
	cfg := h.Config()
	const slot = 0x1f
	if err := h.Ensure(slot); err != nil {
		t.Fatal(err)
	}
	if n := cfg.HostVeth(cfg.Slots() - 1); len(n) > 15 {
		t.Errorf("host veth name %q is %d characters; the kernel allows 15", n, len(n))
	}
	inside := snapshotNS(t, cfg.NamespacePath(slot))
	tap, ok := inside.links[network.TapName]
	if !ok {
		t.Fatalf("no %s in the VM's namespace: %v", network.TapName, inside.links)
	}
	// Down until a VMM opens it (PrepareTAP/ActivateTAP).
	if tap.mac != cfg.GatewayMAC().String() || tap.up || !tap.has(cfg.GatewayAddr(), cfg.Guest.Bits()) {
		t.Errorf("%s = %+v, want down, MAC %s, address %s/%d", network.TapName, tap, cfg.GatewayMAC(), cfg.GatewayAddr(), cfg.Guest.Bits())
	}
	if mac := inside.neigh[cfg.GuestAddr()]; mac != cfg.GuestMAC.String() {
		t.Errorf("permanent neighbour for the guest %s = %q, want %s", cfg.GuestAddr(), mac, cfg.GuestMAC)
	}
	veth, ok := inside.links[network.NSVethName]
	if !ok || !veth.up || !veth.has(cfg.Address(slot), 32) {
		t.Errorf("%s = %+v (present %v), want up with %s/32", network.NSVethName, veth, ok, cfg.Address(slot))
	}
	if !inside.defaultVia(cfg.HostAddr()) {
		t.Errorf("VM namespace routes %v: want a default route via %s", inside.routes, cfg.HostAddr())
	}
	if got := inside.tables; len(got) != 1 || got[0] != "forkd" {
		t.Errorf("nftables tables in the VM's namespace = %v, want [forkd]", got)
	}
	outside := snapshotNS(t, daemonNS)
	hv, ok := outside.links[cfg.HostVeth(slot)]
	if !ok || !hv.up || !hv.has(cfg.HostAddr(), 32) {
		t.Errorf("host veth %s = %+v (present %v), want up with %s/32", cfg.HostVeth(slot), hv, ok, cfg.HostAddr())
	}
	if !outside.routeTo(cfg.Address(slot), cfg.HostVeth(slot)) {
		t.Errorf("daemon namespace routes %v: want %s/32 dev %s", outside.routes, cfg.Address(slot), cfg.HostVeth(slot))
	}
	if !h.Complete(slot) {
		t.Error("Complete = false after Ensure")
	}
	present, err := h.Present()
	if err != nil || len(present) != 1 || !present[slot] {
		t.Errorf("Present = %v, %v; want just slot %d", present, err, slot)
	}
}

// TestGuestIsReachableAtItsAddress sends a datagram from the daemon's
// namespace to a VM's address and checks it reaches the TAP addressed to
// the guest (DNAT), and that the guest's reply comes back from the VM's
// address (conntrack undoes the DNAT).
func TestGuestIsReachableAtItsAddress(t *testing.T) {
	h, daemonNS := testHost(t, false)
	cfg := h.Config()
	const slot = 3
	if err := h.Ensure(slot); err != nil {
		t.Fatal(err)
	}
	g := openGuest(t, h, slot)
	c := udpIn(t, daemonNS, netip.AddrPort{})
	vm := netip.AddrPortFrom(cfg.Address(slot), 9999)
	if _, err := c.WriteToUDPAddrPort([]byte("hello"), vm); err != nil {
		t.Fatal(err)
	}
	f, ok := g.read(t, 10*time.Second)
	if !ok {
		t.Fatalf("nothing reached the guest's TAP after a datagram to %s", vm)
	}
	if f.dst != cfg.GuestAddr() || f.dstPort != 9999 || f.dstMAC.String() != cfg.GuestMAC.String() || string(f.payload) != "hello" {
		t.Fatalf("the guest got %+v; want %q to %s:9999 at MAC %s", f, "hello", cfg.GuestAddr(), cfg.GuestMAC)
	}
	if f.src != cfg.HostAddr() {
		t.Errorf("the guest sees the datagram from %s, want the host address %s", f.src, cfg.HostAddr())
	}
	g.send(t, 9999, f.src, f.srcPort, []byte("world"))
	from, b, ok := recvFrom(t, c, 10*time.Second)
	if !ok || from != vm || string(b) != "world" {
		t.Fatalf("reply: got %q from %s (arrived %v), want %q from %s", b, from, ok, "world", vm)
	}
}

// TestRemoveLeavesNothing counts namespaces, links, routes and nftables
// tables before Ensure and after Remove.
func TestRemoveLeavesNothing(t *testing.T) {
	h, daemonNS := testHost(t, false)
	before := snapshotNS(t, daemonNS)
	// Only this Host's tag: other tests (and other engineers' test runs)
	// make and remove namespaces of their own meanwhile.
	tag := h.Config().Tag
	if n := countNamespaces(t, tag); n != 0 {
		t.Fatalf("%d named namespaces of the fresh tag %s before any Ensure", n, tag)
	}
	for s := 0; s < 3; s++ {
		if err := h.Ensure(s); err != nil {
			t.Fatal(err)
		}
	}
	if got := countNamespaces(t, tag); got != 3 {
		t.Fatalf("%d named namespaces of tag %s after 3 Ensures, want 3", got, tag)
	}
	for s := 0; s < 3; s++ {
		if err := h.Remove(s); err != nil {
			t.Fatal(err)
		}
	}
	after := snapshotNS(t, daemonNS)
	if got := countNamespaces(t, tag); got != 0 {
		t.Errorf("%d named namespaces of tag %s after Remove, want none", got, tag)
	}
	if len(after.links) != len(before.links) || len(after.routes) != len(before.routes) || len(after.tables) != len(before.tables) {
		t.Errorf("daemon namespace after Remove: links %v routes %v tables %v; before: links %v routes %v tables %v",
			after.linkNames(), after.routes, after.tables, before.linkNames(), before.routes, before.tables)
	}
	if p, err := h.Present(); err != nil || len(p) != 0 {
		t.Errorf("Present after Remove = %v, %v; want none", p, err)
	}
	if err := h.Remove(1); err != nil {
		t.Errorf("Remove of a removed slot: %v, want nil", err)
	}
}

// TestEnsureRepairsWithoutReplacingTheTAP removes a VM's host veth (as a
// crash mid-setup or an administrator might) and checks Ensure puts it
// back while the TAP a running VMM would hold stays the same device.
func TestEnsureRepairsWithoutReplacingTheTAP(t *testing.T) {
	h, daemonNS := testHost(t, false)
	cfg := h.Config()
	if err := h.Ensure(0); err != nil {
		t.Fatal(err)
	}
	g := openGuest(t, h, 0)
	tapBefore := snapshotNS(t, cfg.NamespacePath(0)).links[network.TapName].index
	deleteLink(t, daemonNS, cfg.HostVeth(0))
	if h.Complete(0) {
		t.Fatal("Complete = true with the host veth gone")
	}
	if err := h.Ensure(0); err != nil {
		t.Fatal(err)
	}
	if !h.Complete(0) {
		t.Fatal("Complete = false after the repair")
	}
	if got := snapshotNS(t, cfg.NamespacePath(0)).links[network.TapName].index; got != tapBefore {
		t.Errorf("TAP ifindex %d after repair, want the same device %d", got, tapBefore)
	}
	c := udpIn(t, daemonNS, netip.AddrPort{})
	if _, err := c.WriteToUDPAddrPort([]byte("again"), netip.AddrPortFrom(cfg.Address(0), 7)); err != nil {
		t.Fatal(err)
	}
	if f, ok := g.read(t, 10*time.Second); !ok || string(f.payload) != "again" {
		t.Fatalf("after the repair the guest got %+v (arrived %v), want %q", f, ok, "again")
	}
}

// TestTagsKeepDaemonsApart makes two Hosts with different tags in one
// namespace and checks neither sees or removes the other's slots.
func TestTagsKeepDaemonsApart(t *testing.T) {
	a, daemonNS := testHost(t, false)
	cfgB := a.Config()
	cfgB.Tag = "0" + cfgB.Tag[1:]
	if cfgB.Tag == a.Config().Tag {
		cfgB.Tag = "1" + cfgB.Tag[1:]
	}
	cfgB.Pool = netip.MustParsePrefix("198.18.1.0/24")
	var b *network.Host
	if err := network.Do(daemonNS, func() (err error) { b, err = network.New(cfgB); return err }); err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := a.Ensure(0); err != nil {
		t.Fatal(err)
	}
	defer b.Remove(0)
	// Same slot, another tag: its own namespace and veth names.
	if err := b.Ensure(0); err != nil {
		t.Fatal(err)
	}
	pa, _ := a.Present()
	pb, _ := b.Present()
	if !pa[0] || !pb[0] || len(pa) != 1 || len(pb) != 1 {
		t.Fatalf("Present: a %v, b %v; want each to see only its own slot 0", pa, pb)
	}
	if err := b.Remove(0); err != nil {
		t.Fatal(err)
	}
	if !a.Complete(0) {
		t.Fatal("removing b's slot 0 broke a's slot 0")
	}
}
