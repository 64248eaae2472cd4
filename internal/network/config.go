package network

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// Defaults of the guest side, shared by every VM (Firecracker's clone
// example): guest 169.254.0.21, gateway 169.254.0.22, in a /30.
const (
	DefaultGuestCIDR = "169.254.0.20/30"
	DefaultGuestMAC  = "02:fc:00:00:00:05"
)

// Fixed names. Every VM's namespace holds the same two links, so a VMM
// restored in any of them finds its TAP by the name the vmstate stores.
const (
	// TapName is the TAP every VM's guest NIC is attached to.
	TapName = "tap0"
	// NSVethName is the namespace's end of the veth pair.
	NSVethName = "veth0"
	// nftTable is the table forkd keeps inside each VM's namespace.
	nftTable = "forkd"
)

// maxLinkName is the kernel's limit on an interface name (IFNAMSIZ - 1).
const maxLinkName = 15

// Config is one daemon's networking: the pool its VMs' host-side addresses
// come from, the guest identity every VM shares, and the tag that marks
// every kernel object it creates as its own.
type Config struct {
	// Pool is network_cidr. Its first usable address is the host's end of
	// every veth (one address shared by all VMs); each VM takes one more.
	Pool netip.Prefix
	// Guest is network_guest_cidr: the guest takes its first usable
	// address, the gateway (the TAP) its last.
	Guest netip.Prefix
	// GuestMAC is network_guest_mac.
	GuestMAC net.HardwareAddr
	// Egress lets guests open connections beyond the host (masqueraded
	// behind the daemon's addresses): network_egress.
	Egress bool
	// Tag marks every name this daemon creates (Tag(dataDir)).
	Tag string
	// RootNamespace lets the Host network VMs from the host's initial
	// network namespace (network_root_namespace): what a production
	// daemon on the host itself does. Without it New refuses that
	// namespace (ErrRootNamespace); see rootns.go.
	RootNamespace bool
}

// tagLen is how many hex digits of the data dir's hash a tag keeps. Six
// leave room in a 15-character link name for "fk", a dash and a slot of
// up to six hex digits.
const tagLen = 6

// Tag is the short, stable tag of a data dir: two daemons on one host (or
// two parallel test packages) get different tags, so neither ever touches
// the other's namespaces, links or rules.
func Tag(dataDir string) string {
	sum := sha256.Sum256([]byte(dataDir))
	return hex.EncodeToString(sum[:])[:tagLen]
}

// ParseConfig builds a Config from the settings' text and validates it.
func ParseConfig(pool, guest, mac string, egress bool, tag string) (Config, error) {
	var c Config
	var err error
	if c.Pool, err = netip.ParsePrefix(pool); err != nil {
		return Config{}, fmt.Errorf("network_cidr %q: %w", pool, err)
	}
	if c.Guest, err = netip.ParsePrefix(guest); err != nil {
		return Config{}, fmt.Errorf("network_guest_cidr %q: %w", guest, err)
	}
	if c.GuestMAC, err = net.ParseMAC(mac); err != nil {
		return Config{}, fmt.Errorf("network_guest_mac %q: %w", mac, err)
	}
	c.Egress, c.Tag = egress, tag
	return c, c.Validate()
}

// Validate checks that the pool and the guest range are usable and apart.
func (c Config) Validate() error {
	if !c.Pool.IsValid() || !c.Pool.Addr().Is4() {
		return fmt.Errorf("network_cidr %s: want an IPv4 prefix such as 10.200.0.0/16", c.Pool)
	}
	if c.Pool.Masked() != c.Pool {
		return fmt.Errorf("network_cidr %s: host bits set; did you mean %s?", c.Pool, c.Pool.Masked())
	}
	if b := c.Pool.Bits(); b < 8 || b > 30 {
		return fmt.Errorf("network_cidr %s: prefix length must be between /8 and /30 (a /30 holds one VM)", c.Pool)
	}
	if !c.Guest.IsValid() || !c.Guest.Addr().Is4() {
		return fmt.Errorf("network_guest_cidr %s: want an IPv4 prefix such as %s", c.Guest, DefaultGuestCIDR)
	}
	if c.Guest.Masked() != c.Guest {
		return fmt.Errorf("network_guest_cidr %s: host bits set; did you mean %s?", c.Guest, c.Guest.Masked())
	}
	if c.Guest.Bits() > 30 {
		return fmt.Errorf("network_guest_cidr %s: too small; a /30 or larger holds the guest and its gateway", c.Guest)
	}
	if c.Pool.Overlaps(c.Guest) {
		return fmt.Errorf("network_cidr %s overlaps network_guest_cidr %s: host-side addresses must differ from the guest's", c.Pool, c.Guest)
	}
	if len(c.GuestMAC) != 6 || c.GuestMAC[0]&1 != 0 {
		return fmt.Errorf("network_guest_mac %s: want a unicast 6-byte MAC such as %s", c.GuestMAC, DefaultGuestMAC)
	}
	if len(c.Tag) != tagLen || strings.Trim(c.Tag, "0123456789abcdef") != "" {
		return fmt.Errorf("network tag %q: want %d lower-case hex digits (network.Tag)", c.Tag, tagLen)
	}
	if c.Slots() > maxSlots {
		return fmt.Errorf("network_cidr %s: more than %d addresses", c.Pool, maxSlots)
	}
	return nil
}

// maxSlots is the most VMs a pool may address: a slot is written in six
// hex digits in link names.
const maxSlots = 1 << 24

func u32(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func addr4(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// HostAddr is the host's end of every veth: the pool's first usable
// address.
func (c Config) HostAddr() netip.Addr { return addr4(u32(c.Pool.Addr()) + 1) }

// Slots is how many VMs the pool addresses: every address but the network,
// broadcast and host addresses. Each VM consumes exactly one.
func (c Config) Slots() int { return 1<<(32-c.Pool.Bits()) - 3 }

// Address is the host-side address of the VM in slot (0-based).
func (c Config) Address(slot int) netip.Addr { return addr4(u32(c.Pool.Addr()) + 2 + uint32(slot)) }

// SlotOf is the slot whose address is a, if a is a VM address of the pool.
func (c Config) SlotOf(a netip.Addr) (int, bool) {
	if !a.Is4() || !c.Pool.Contains(a) {
		return 0, false
	}
	s := int(u32(a)) - int(u32(c.Pool.Addr())) - 2
	if s < 0 || s >= c.Slots() {
		return 0, false
	}
	return s, true
}

// GuestAddr is every guest's address: the guest range's first usable one.
func (c Config) GuestAddr() netip.Addr { return addr4(u32(c.Guest.Addr()) + 1) }

// GatewayAddr is every guest's gateway, the TAP's address: the guest
// range's last usable one.
func (c Config) GatewayAddr() netip.Addr {
	return addr4(u32(c.Guest.Addr()) + 1<<(32-c.Guest.Bits()) - 2)
}

// GatewayMAC is the TAP's MAC: the guest MAC with the low bit of its last
// byte flipped. It is the same in every namespace, so a restored guest's
// cached gateway entry stays right (a new TAP would otherwise get a random
// MAC the guest's ARP cache does not know).
func (c Config) GatewayMAC() net.HardwareAddr {
	m := append(net.HardwareAddr{}, c.GuestMAC...)
	m[5] ^= 1
	return m
}

// nsVethMAC is the MAC of every namespace's veth end (each is alone on its
// point-to-point link, so one value serves all).
var nsVethMAC = net.HardwareAddr{0x02, 0xfc, 0xff, 0, 0, 1}

// hostVethMAC is the MAC of slot's veth end in the daemon's namespace.
// Both ends' MACs are fixed so that each side can hold a permanent
// neighbour entry for the other: no ARP ever runs on the veth (an ARP
// request the host sends on behalf of a connection from 127.0.0.1 carries
// that loopback source, and the namespace rightly drops it as martian).
func hostVethMAC(slot int) net.HardwareAddr {
	return net.HardwareAddr{0x02, 0xfc, 0xfe, byte(slot >> 16), byte(slot >> 8), byte(slot)}
}

// BootIP is the kernel's ip= argument that gives the guest its address
// (client-ip:server-ip:gw-ip:netmask:hostname:device:autoconf).
func (c Config) BootIP() string {
	mask := net.CIDRMask(c.Guest.Bits(), 32)
	return fmt.Sprintf("ip=%s::%s:%d.%d.%d.%d::eth0:off", c.GuestAddr(), c.GatewayAddr(), mask[0], mask[1], mask[2], mask[3])
}

// Namespace is the name of the named network namespace of slot (a bind
// mount under /var/run/netns, as `ip netns` makes).
func (c Config) Namespace(slot int) string {
	return "forkd-" + c.Tag + "-" + strconv.FormatInt(int64(slot), 16)
}

// NamespacePath is where Namespace(slot) is mounted.
func (c Config) NamespacePath(slot int) string { return nsDir + "/" + c.Namespace(slot) }

// HostVeth is the name of slot's veth end in the daemon's namespace:
// "fk" + tag + "-" + slot in hex, at most 15 characters.
func (c Config) HostVeth(slot int) string { return c.linkPrefix() + strconv.FormatInt(int64(slot), 16) }

// linkPrefix starts every host-side link name of this tag.
func (c Config) linkPrefix() string { return "fk" + c.Tag + "-" }

// nsPrefix starts every namespace name of this tag.
func (c Config) nsPrefix() string { return "forkd-" + c.Tag + "-" }

// hostTable is the nftables table forkd keeps in the daemon's namespace.
func (c Config) hostTable() string { return "forkd_" + c.Tag }

// slotOfName parses the slot out of a name that starts with prefix.
func slotOfName(name, prefix string) (int, bool) {
	rest, ok := strings.CutPrefix(name, prefix)
	if !ok || rest == "" || len(rest) > 6 {
		return 0, false
	}
	n, err := strconv.ParseUint(rest, 16, 32)
	if err != nil || strconv.FormatUint(n, 16) != rest {
		return 0, false
	}
	return int(n), true
}
