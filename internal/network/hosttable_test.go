package network_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/network"
)

// absent is how long a test waits to conclude a dropped packet is not
// coming. A drop can only be observed as absence; each such check has a
// twin in which the same packet, without the rule, does arrive.
const absent = 500 * time.Millisecond

// isolationCase sends, from slot 0's guest, one datagram to slot 1's
// address and one to a socket in the daemon's namespace, and reports which
// arrived.
func isolationCase(t *testing.T, h *network.Host, daemonNS string, g0, g1 *fakeGuest) (toSibling, toHost bool) {
	t.Helper()
	cfg := h.Config()
	host := udpIn(t, daemonNS, netip.AddrPortFrom(cfg.HostAddr(), 0))
	hostPort := uint16(host.LocalAddr().(interface{ AddrPort() netip.AddrPort }).AddrPort().Port())
	g0.send(t, 4000, cfg.Address(1), 5000, []byte("to sibling"))
	g0.send(t, 4001, cfg.HostAddr(), hostPort, []byte("to host"))
	_, toSibling = g1.read(t, absent)
	_, _, toHost = recvFrom(t, host, absent)
	return toSibling, toHost
}

// TestVMsReachNeitherSiblingsNorHostServices: with egress on (so the
// daemon's namespace forwards), slot 0's guest can reach neither slot 1's
// address nor a service in the daemon's namespace, while the daemon still
// reaches both guests.
func TestVMsReachNeitherSiblingsNorHostServices(t *testing.T) {
	h, daemonNS := testHost(t, true)
	for s := 0; s < 2; s++ {
		if err := h.Ensure(s); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.Init(nil); err != nil {
		t.Fatal(err)
	}
	g := openGuest(t, h, 1)
	toSibling, toHost := isolationCase(t, h, daemonNS, openGuest(t, h, 0), g)
	if toSibling {
		t.Error("slot 0's guest reached slot 1's guest")
	}
	if toHost {
		t.Error("slot 0's guest reached a service in the daemon's namespace")
	}
	// The host still reaches a guest (and gets its reply) with the table on.
	c := udpIn(t, daemonNS, netip.AddrPort{})
	if _, err := c.WriteToUDPAddrPort([]byte("ping"), netip.AddrPortFrom(h.Config().Address(1), 7)); err != nil {
		t.Fatal(err)
	}
	f, ok := g.read(t, 10*time.Second)
	if !ok {
		t.Fatal("with the host table on, the daemon's datagram did not reach the guest")
	}
	g.send(t, 7, f.src, f.srcPort, []byte("pong"))
	if _, b, ok := recvFrom(t, c, 10*time.Second); !ok || string(b) != "pong" {
		t.Fatalf("reply to the host's own connection was dropped (got %q, %v)", b, ok)
	}
}

// TestIsolationTwin is the twin of the isolation test: without the host
// table, the same two datagrams do arrive, so the test above can fail.
func TestIsolationTwin(t *testing.T) {
	h, daemonNS := testHost(t, true)
	for s := 0; s < 2; s++ {
		if err := h.Ensure(s); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.Init(nil); err != nil {
		t.Fatal(err)
	}
	if err := h.RemoveHostTable(); err != nil {
		t.Fatal(err)
	}
	toSibling, toHost := isolationCase(t, h, daemonNS, openGuest(t, h, 0), openGuest(t, h, 1))
	if !toSibling || !toHost {
		t.Fatalf("without the host table: to sibling %v, to host %v; want both delivered (else the isolation test proves nothing)", toSibling, toHost)
	}
}

// TestPublishForwardsAHostPortToTheGuest publishes 127.0.0.1:8080 to guest
// port 80 and checks a datagram to it reaches the guest's port 80 and the
// reply comes back from 127.0.0.1:8080; removing the publish stops it.
func TestPublishForwardsAHostPortToTheGuest(t *testing.T) {
	h, daemonNS := testHost(t, false)
	if err := h.Ensure(0); err != nil {
		t.Fatal(err)
	}
	if err := h.Init(nil); err != nil {
		t.Fatal(err)
	}
	p, err := network.ParsePublish("127.0.0.1:8080:80/udp")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.CheckPorts([]network.Publish{p}); err != nil {
		t.Fatal(err)
	}
	if err := h.AddPublishes(0, []network.Publish{p}); err != nil {
		t.Fatal(err)
	}
	g := openGuest(t, h, 0)
	c := udpIn(t, daemonNS, netip.MustParseAddrPort("127.0.0.1:0"))
	pub := netip.MustParseAddrPort("127.0.0.1:8080")
	if _, err := c.WriteToUDPAddrPort([]byte("published"), pub); err != nil {
		t.Fatal(err)
	}
	f, ok := g.read(t, 10*time.Second)
	if !ok || f.dstPort != 80 || string(f.payload) != "published" {
		t.Fatalf("guest got %+v (arrived %v), want %q on port 80", f, ok, "published")
	}
	g.send(t, 80, f.src, f.srcPort, []byte("reply"))
	if from, b, ok := recvFrom(t, c, 10*time.Second); !ok || from != pub || string(b) != "reply" {
		t.Fatalf("reply: %q from %s (arrived %v), want %q from %s", b, from, ok, "reply", pub)
	}
	if err := h.RemovePublishes(0); err != nil {
		t.Fatal(err)
	}
	c2 := udpIn(t, daemonNS, netip.MustParseAddrPort("127.0.0.1:0"))
	if _, err := c2.WriteToUDPAddrPort([]byte("unpublished"), pub); err != nil {
		t.Fatal(err)
	}
	if f, ok := g.read(t, absent); ok {
		t.Fatalf("after RemovePublishes the guest still got %+v", f)
	}
}

// TestCheckPortsRefusesAPortInUse: a port a process in the daemon's
// namespace holds is refused with ErrPortInUse.
func TestCheckPortsRefusesAPortInUse(t *testing.T) {
	h, daemonNS := testHost(t, false)
	c := udpIn(t, daemonNS, netip.MustParseAddrPort("127.0.0.1:0"))
	port := c.LocalAddr().(interface{ AddrPort() netip.AddrPort }).AddrPort().Port()
	p := network.Publish{HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: port, GuestPort: 80, Protocol: "udp"}
	if err := h.CheckPorts([]network.Publish{p}); err == nil {
		t.Fatalf("CheckPorts(%s) with the port held: nil, want ErrPortInUse", p)
	}
	c.Close()
	if err := h.CheckPorts([]network.Publish{p}); err != nil {
		t.Fatalf("CheckPorts(%s) once released: %v", p, err)
	}
}
