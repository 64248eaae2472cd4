// Package testnet gives a test a network namespace of its own with a TAP
// in it, and the means to talk to a guest behind that TAP from inside the
// namespace only. It is for tests: it imports "testing".
//
// Its namespaces come from nettest.Namespace (a random name per test,
// removed by t.Cleanup, with everything inside), and every packet a test sends through it is sent
// from a socket created inside the test's namespace, after checking that
// the thread is not in the namespace the test process started in: nothing
// can leave the machine.
package testnet

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/network/nettest"
)

// NS is a named network namespace one test made.
type NS struct {
	t    testing.TB
	Name string
	Path string // /var/run/netns/<Name>
	host netns.NsHandle
}

// New creates a network namespace for the test (nettest.Namespace: it
// skips or fails through testenv where namespaces cannot be made, and is
// removed when the test ends).
func New(t testing.TB) *NS {
	t.Helper()
	path := nettest.Namespace(t)
	host, err := netns.GetFromPid(os.Getpid())
	if err != nil {
		t.Fatalf("cannot read the test process's network namespace: %v", err)
	}
	t.Cleanup(func() { host.Close() })
	return &NS{t: t, Name: filepath.Base(path), Path: path, host: host}
}

// Do runs fn on a thread inside the namespace, after checking that the
// thread really left the test process's own namespace. A failure fails the
// test.
func (ns *NS) Do(fn func() error) {
	ns.t.Helper()
	if err := ns.Try(fn); err != nil {
		ns.t.Fatalf("in netns %s: %v", ns.Name, err)
	}
}

// Try is Do that returns fn's error instead of failing the test.
func (ns *NS) Try(fn func() error) error {
	return network.Do(ns.Path, func() error {
		cur, err := netns.Get()
		if err != nil {
			return err
		}
		defer cur.Close()
		if cur.Equal(ns.host) {
			return fmt.Errorf("refusing to act: the thread is still in the test process's namespace")
		}
		return fn()
	})
}

// TAP describes a TAP the test owns in its namespace.
type TAP struct {
	Name string
	MAC  net.HardwareAddr
	Addr netip.Prefix // the host side's (gateway's) address
	// Down leaves the TAP down, to be brought up (SetUp) once a VMM holds
	// it, as the manager does: a TAP already up when its carrier comes on
	// drops frames until the kernel's deferred link-watch event activates
	// its queue.
	Down bool
}

// AddTAP creates a persistent, single-queue TAP in the namespace, as a VM
// manager would, with the MAC and address given, and brings it up. It is
// removed with the namespace.
func (ns *NS) AddTAP(tap TAP) {
	ns.t.Helper()
	ns.Do(func() error {
		l := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: tap.Name}, Mode: netlink.TUNTAP_MODE_TAP,
			Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR}
		if err := netlink.LinkAdd(l); err != nil {
			return fmt.Errorf("add tap %s: %w", tap.Name, err)
		}
		link, err := netlink.LinkByName(tap.Name)
		if err != nil {
			return err
		}
		if tap.MAC != nil {
			if err := netlink.LinkSetHardwareAddr(link, tap.MAC); err != nil {
				return fmt.Errorf("set MAC of %s: %w", tap.Name, err)
			}
		}
		if tap.Addr.IsValid() {
			a := &netlink.Addr{IPNet: &net.IPNet{IP: tap.Addr.Addr().AsSlice(), Mask: net.CIDRMask(tap.Addr.Bits(), 32)}}
			if err := netlink.AddrAdd(link, a); err != nil {
				return fmt.Errorf("add %s to %s: %w", tap.Addr, tap.Name, err)
			}
		}
		if tap.Down {
			return nil
		}
		return netlink.LinkSetUp(link)
	})
}

// SetUp brings link up.
func (ns *NS) SetUp(link string) {
	ns.t.Helper()
	ns.Do(func() error {
		l, err := netlink.LinkByName(link)
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(l)
	})
}

// Start starts cmd with its network namespace the test's.
func (ns *NS) Start(cmd *exec.Cmd) error {
	return ns.Try(cmd.Start)
}

// Dial opens a TCP connection from inside the namespace.
func (ns *NS) Dial(ctx context.Context, addr string) (net.Conn, error) {
	var c net.Conn
	err := ns.Try(func() error {
		var err error
		c, err = (&net.Dialer{}).DialContext(ctx, "tcp4", addr)
		return err
	})
	return c, err
}

// HTTPClient is a client whose every connection is dialled inside the
// namespace. It never retries: a refused first connection is an error.
func (ns *NS) HTTPClient(timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return ns.Dial(ctx, addr)
		},
	}}
}

// Pinger sends ICMP echo requests from a raw socket inside the namespace.
type Pinger struct {
	c  *icmp.PacketConn
	id int
}

// NewPinger opens a raw ICMP socket in the namespace; t.Cleanup closes it.
func (ns *NS) NewPinger() *Pinger {
	ns.t.Helper()
	var c *icmp.PacketConn
	ns.Do(func() error {
		var err error
		c, err = icmp.ListenPacket("ip4:icmp", "0.0.0.0")
		return err
	})
	ns.t.Cleanup(func() { c.Close() })
	var b [2]byte
	rand.Read(b[:])
	return &Pinger{c: c, id: int(b[0])<<8 | int(b[1])}
}

// Send sends one echo request with sequence number seq.
func (p *Pinger) Send(dst netip.Addr, seq int) error {
	msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: p.id, Seq: seq, Data: []byte("forkd-ping")}}
	b, err := msg.Marshal(nil)
	if err != nil {
		return err
	}
	_, err = p.c.WriteTo(b, &net.IPAddr{IP: dst.AsSlice()})
	return err
}

// Wait waits until deadline for the echo reply to seq from dst, ignoring
// other ICMP traffic.
func (p *Pinger) Wait(dst netip.Addr, seq int, deadline time.Time) error {
	buf := make([]byte, 1500)
	p.c.SetReadDeadline(deadline)
	for {
		n, from, err := p.c.ReadFrom(buf)
		if err != nil {
			return fmt.Errorf("no echo reply %d from %s: %w", seq, dst, err)
		}
		if from.String() != dst.String() {
			continue
		}
		m, err := icmp.ParseMessage(1, buf[:n])
		if err != nil || m.Type != ipv4.ICMPTypeEchoReply {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && e.ID == p.id && e.Seq == seq {
			return nil
		}
	}
}

// Ping sends one echo request and waits for its reply: no retry.
func (p *Pinger) Ping(dst netip.Addr, seq int, timeout time.Duration) error {
	if err := p.Send(dst, seq); err != nil {
		return err
	}
	return p.Wait(dst, seq, time.Now().Add(timeout))
}

// LinkCounter reads one of /sys/class/net/<link>/statistics/<name> inside
// the namespace (sysfs shows the mounting thread's namespace, so it is read
// through netlink instead).
func (ns *NS) LinkCounter(link, name string) uint64 {
	ns.t.Helper()
	var v uint64
	ns.Do(func() error {
		l, err := netlink.LinkByName(link)
		if err != nil {
			return err
		}
		s := l.Attrs().Statistics
		if s == nil {
			return fmt.Errorf("no statistics for %s", link)
		}
		switch name {
		case "tx_packets":
			v = s.TxPackets
		case "rx_packets":
			v = s.RxPackets
		case "tx_dropped":
			v = s.TxDropped
		default:
			return fmt.Errorf("unknown counter %q", name)
		}
		return nil
	})
	return v
}

// Neighbour sets a permanent neighbour entry for addr on link, so the
// namespace sends to addr without resolving it first.
func (ns *NS) Neighbour(link string, addr netip.Addr, mac net.HardwareAddr) {
	ns.t.Helper()
	ns.Do(func() error {
		l, err := netlink.LinkByName(link)
		if err != nil {
			return err
		}
		return netlink.NeighSet(&netlink.Neigh{LinkIndex: l.Attrs().Index, State: netlink.NUD_PERMANENT,
			IP: addr.AsSlice(), HardwareAddr: mac, Family: netlink.FAMILY_V4})
	})
}

// NeighbourMAC is the MAC the namespace has resolved addr to on link ("" if
// none).
func (ns *NS) NeighbourMAC(link string, addr netip.Addr) string {
	ns.t.Helper()
	var mac string
	ns.Do(func() error {
		l, err := netlink.LinkByName(link)
		if err != nil {
			return err
		}
		neighs, err := netlink.NeighList(l.Attrs().Index, netlink.FAMILY_V4)
		for _, n := range neighs {
			if n.IP.Equal(addr.AsSlice()) && n.HardwareAddr != nil {
				mac = n.HardwareAddr.String()
			}
		}
		return err
	})
	return mac
}

// Carrier reports whether link has carrier: for a TAP, whether a process
// holds it open (attached).
func (ns *NS) Carrier(link string) bool {
	ns.t.Helper()
	var up bool
	ns.Do(func() error {
		l, err := netlink.LinkByName(link)
		if err != nil {
			return err
		}
		up = l.Attrs().RawFlags&unix.IFF_LOWER_UP != 0
		return nil
	})
	return up
}

// ParseMAC is net.ParseMAC that fails the test.
func ParseMAC(t testing.TB, s string) net.HardwareAddr {
	t.Helper()
	m, err := net.ParseMAC(s)
	if err != nil {
		t.Fatal(err)
	}
	return m
}
