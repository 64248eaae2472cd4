package network_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/network"
)

// fakeGuest stands where a VMM's guest NIC would: it holds slot's TAP open
// (inside the slot's namespace, as a VMM does) and reads and writes raw
// Ethernet frames, so tests can see exactly what reaches a guest and send
// what a guest would, without any VMM.
type fakeGuest struct {
	f   *os.File
	cfg network.Config
}

func openGuest(t *testing.T, h *network.Host, slot int) *fakeGuest {
	t.Helper()
	var f *os.File
	err := network.Do(h.Config().NamespacePath(slot), func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		var req [40]byte
		copy(req[:], network.TapName)
		*(*uint16)(unsafe.Pointer(&req[16])) = unix.IFF_TAP | unix.IFF_NO_PI
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETIFF, uintptr(unsafe.Pointer(&req[0]))); e != 0 {
			unix.Close(fd)
			return e
		}
		if err := unix.SetNonblock(fd, true); err != nil {
			unix.Close(fd)
			return err
		}
		f = os.NewFile(uintptr(fd), "tap")
		return nil
	})
	if err != nil {
		t.Fatalf("open %s in slot %d: %v", network.TapName, slot, err)
	}
	t.Cleanup(func() { f.Close() })
	// What the manager does once a VMM has opened the TAP.
	if err := h.ActivateTAP(slot); err != nil {
		t.Fatal(err)
	}
	return &fakeGuest{f: f, cfg: h.Config()}
}

// udpFrame is one IPv4/UDP packet as seen on the TAP.
type udpFrame struct {
	dstMAC, srcMAC   net.HardwareAddr
	src, dst         netip.Addr
	srcPort, dstPort uint16
	payload          []byte
}

// read returns the next IPv4 UDP frame within the deadline (other frames
// are skipped), or ok=false.
func (g *fakeGuest) read(t *testing.T, within time.Duration) (udpFrame, bool) {
	t.Helper()
	g.f.SetReadDeadline(time.Now().Add(within))
	buf := make([]byte, 2048)
	for {
		n, err := g.f.Read(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return udpFrame{}, false
		}
		if err != nil {
			t.Fatalf("read tap: %v", err)
		}
		b := buf[:n]
		if len(b) < 14+20+8 || binary.BigEndian.Uint16(b[12:]) != 0x0800 || b[14+9] != unix.IPPROTO_UDP {
			continue
		}
		ip := b[14:]
		ihl := int(ip[0]&0xf) * 4
		u := ip[ihl:]
		return udpFrame{
			dstMAC: net.HardwareAddr(append([]byte{}, b[0:6]...)), srcMAC: net.HardwareAddr(append([]byte{}, b[6:12]...)),
			src: netip.AddrFrom4([4]byte(ip[12:16])), dst: netip.AddrFrom4([4]byte(ip[16:20])),
			srcPort: binary.BigEndian.Uint16(u[0:]), dstPort: binary.BigEndian.Uint16(u[2:]),
			payload: append([]byte{}, u[8:binary.BigEndian.Uint16(u[4:])]...),
		}, true
	}
}

// send writes a UDP packet from the guest (guest MAC and address) to dst.
func (g *fakeGuest) send(t *testing.T, srcPort uint16, dst netip.Addr, dstPort uint16, payload []byte) {
	t.Helper()
	var b bytes.Buffer
	b.Write(g.cfg.GatewayMAC())
	b.Write(g.cfg.GuestMAC)
	b.Write([]byte{0x08, 0x00})
	ip := make([]byte, 20)
	ip[0], ip[8], ip[9] = 0x45, 64, unix.IPPROTO_UDP
	binary.BigEndian.PutUint16(ip[2:], uint16(20+8+len(payload)))
	s, d := g.cfg.GuestAddr().As4(), dst.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	b.Write(ip)
	u := make([]byte, 8)
	binary.BigEndian.PutUint16(u[0:], srcPort)
	binary.BigEndian.PutUint16(u[2:], dstPort)
	binary.BigEndian.PutUint16(u[4:], uint16(8+len(payload)))
	b.Write(u)
	b.Write(payload)
	if _, err := g.f.Write(b.Bytes()); err != nil {
		t.Fatalf("write tap: %v", err)
	}
}

// udpIn opens a UDP socket in namespace ns bound to addr (port 0: any).
func udpIn(t *testing.T, ns string, addr netip.AddrPort) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	err := network.Do(ns, func() (err error) {
		c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		t.Fatalf("listen udp %s in %s: %v", addr, ns, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// recvFrom waits for one datagram; ok=false at the deadline.
func recvFrom(t *testing.T, c *net.UDPConn, within time.Duration) (netip.AddrPort, []byte, bool) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(within))
	buf := make([]byte, 2048)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return netip.AddrPort{}, nil, false
	}
	if err != nil {
		t.Fatalf("recv: %v", err)
	}
	return netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), buf[:n], true
}
