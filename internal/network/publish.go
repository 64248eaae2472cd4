package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Publish is one published port: connections to HostPort on HostIP (every
// address of the daemon's namespace when HostIP is invalid) reach the
// guest's GuestPort.
type Publish struct {
	HostIP    netip.Addr
	HostPort  uint16
	GuestPort uint16
	Protocol  string // "tcp" | "udp"
}

func (p Publish) String() string {
	host := ""
	if p.HostIP.IsValid() {
		host = p.HostIP.String() + ":"
	}
	return fmt.Sprintf("%s%d:%d/%s", host, p.HostPort, p.GuestPort, p.Protocol)
}

// ParsePublish reads Docker's syntax: [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp].
func ParsePublish(s string) (Publish, error) {
	bad := func(why string) (Publish, error) {
		return Publish{}, fmt.Errorf("publish %q: %s; want [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp], e.g. 8080:80", s, why)
	}
	p := Publish{Protocol: "tcp"}
	rest := s
	if i := strings.LastIndexByte(rest, '/'); i >= 0 {
		p.Protocol, rest = rest[i+1:], rest[:i]
	}
	parts := strings.Split(rest, ":")
	switch len(parts) {
	case 2:
	case 3:
		ip, err := netip.ParseAddr(parts[0])
		if err != nil {
			return bad("host IP " + strconv.Quote(parts[0]) + " is not an IPv4 address")
		}
		p.HostIP = ip
		parts = parts[1:]
	default:
		return bad("wrong number of fields")
	}
	for i, dst := range []*uint16{&p.HostPort, &p.GuestPort} {
		n, err := strconv.ParseUint(parts[i], 10, 16)
		if err != nil || n == 0 {
			return bad("port " + strconv.Quote(parts[i]) + " is not 1-65535")
		}
		*dst = uint16(n)
	}
	if err := p.Validate(); err != nil {
		return Publish{}, fmt.Errorf("publish %q: %w", s, err)
	}
	return p, nil
}

// Validate checks a publish built from API fields.
func (p Publish) Validate() error {
	if p.Protocol != "tcp" && p.Protocol != "udp" {
		return fmt.Errorf("protocol %q: want tcp or udp", p.Protocol)
	}
	if p.HostPort == 0 || p.GuestPort == 0 {
		return fmt.Errorf("ports must be 1-65535 (host %d, guest %d)", p.HostPort, p.GuestPort)
	}
	if p.HostIP.IsValid() && (!p.HostIP.Is4() || p.HostIP.IsUnspecified()) {
		if p.HostIP.IsUnspecified() && p.HostIP.Is4() {
			return nil
		}
		return fmt.Errorf("host IP %s: want an IPv4 address of the host", p.HostIP)
	}
	return nil
}

// Normalize makes 0.0.0.0 mean every address (an invalid HostIP).
func (p Publish) Normalize() Publish {
	if p.HostIP.IsValid() && p.HostIP.IsUnspecified() {
		p.HostIP = netip.Addr{}
	}
	return p
}

// Overlaps reports whether p and q claim the same host port.
func (p Publish) Overlaps(q Publish) bool {
	p, q = p.Normalize(), q.Normalize()
	return p.Protocol == q.Protocol && p.HostPort == q.HostPort &&
		(!p.HostIP.IsValid() || !q.HostIP.IsValid() || p.HostIP == q.HostIP)
}

// ErrPortInUse is wrapped when a publish names a port something on the host
// already listens on.
var ErrPortInUse = errors.New("host port in use")

// CheckPorts fails if a process in the daemon's namespace already holds a
// host port of ps (a publish would silently steal its connections), or a
// host IP is not an address of that namespace.
func (h *Host) CheckPorts(ps []Publish) error {
	return h.inDaemonNS(func() error {
		for _, p := range ps {
			p = p.Normalize()
			ip := "0.0.0.0"
			if p.HostIP.IsValid() {
				ip = p.HostIP.String()
			}
			addr := net.JoinHostPort(ip, strconv.Itoa(int(p.HostPort)))
			var err error
			if p.Protocol == "udp" {
				var c net.PacketConn
				if c, err = net.ListenPacket("udp4", addr); err == nil {
					c.Close()
				}
			} else {
				var l net.Listener
				if l, err = net.Listen("tcp4", addr); err == nil {
					l.Close()
				}
			}
			switch {
			case err == nil:
			case errors.Is(err, unix.EADDRINUSE):
				return fmt.Errorf("publish %s: %w: something on the host already listens on %s/%s; pick another host port", p, ErrPortInUse, addr, p.Protocol)
			case errors.Is(err, unix.EADDRNOTAVAIL):
				return fmt.Errorf("publish %s: host IP %s is not an address of this host", p, ip)
			default:
				return fmt.Errorf("publish %s: probe %s/%s: %w", p, addr, p.Protocol, err)
			}
		}
		return nil
	})
}
