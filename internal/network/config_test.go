package network

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/testenv"
)

func TestParseConfigRefusesBadRanges(t *testing.T) {
	for _, tc := range []struct{ pool, guest, mac, want string }{
		{"198.18.0.0/24", DefaultGuestCIDR, DefaultGuestMAC, ""},
		{"198.18.0.0/30", DefaultGuestCIDR, DefaultGuestMAC, ""},
		{"not-a-cidr", DefaultGuestCIDR, DefaultGuestMAC, "network_cidr"},
		{"198.18.0.1/24", DefaultGuestCIDR, DefaultGuestMAC, "host bits set"},
		{"198.18.0.0/31", DefaultGuestCIDR, DefaultGuestMAC, "between /8 and /30"},
		{"fd00::/64", DefaultGuestCIDR, DefaultGuestMAC, "IPv4"},
		{"169.254.0.0/16", DefaultGuestCIDR, DefaultGuestMAC, "overlaps"},
		{"198.18.0.0/24", "198.18.0.0/30", DefaultGuestMAC, "overlaps"},
		{"198.18.0.0/24", "169.254.0.20/31", DefaultGuestMAC, "too small"},
		{"198.18.0.0/24", DefaultGuestCIDR, "01:00:00:00:00:01", "unicast"},
		{"198.18.0.0/24", DefaultGuestCIDR, "zz", "network_guest_mac"},
	} {
		_, err := ParseConfig(tc.pool, tc.guest, tc.mac, false, "abc123")
		if tc.want == "" && err != nil {
			t.Errorf("ParseConfig(%s, %s, %s): %v, want ok", tc.pool, tc.guest, tc.mac, err)
		}
		if tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("ParseConfig(%s, %s, %s): %v, want an error containing %q", tc.pool, tc.guest, tc.mac, err, tc.want)
		}
	}
}

func TestAddressesAndNames(t *testing.T) {
	c, err := ParseConfig("198.18.0.0/24", DefaultGuestCIDR, DefaultGuestMAC, false, "abc123")
	if err != nil {
		t.Fatal(err)
	}
	if c.Slots() != 253 || c.HostAddr().String() != "198.18.0.1" || c.Address(0).String() != "198.18.0.2" || c.Address(252).String() != "198.18.0.254" {
		t.Errorf("slots %d, host %s, first %s, last %s; want 253, .1, .2, .254", c.Slots(), c.HostAddr(), c.Address(0), c.Address(252))
	}
	if s, ok := c.SlotOf(c.Address(7)); !ok || s != 7 {
		t.Errorf("SlotOf(Address(7)) = %d, %v", s, ok)
	}
	for _, a := range []string{"198.18.0.0", "198.18.0.1", "198.18.0.255", "198.18.1.2"} {
		if _, ok := c.SlotOf(mustAddr(a)); ok {
			t.Errorf("SlotOf(%s) = ok, want not a VM address", a)
		}
	}
	if c.GuestAddr().String() != "169.254.0.21" || c.GatewayAddr().String() != "169.254.0.22" {
		t.Errorf("guest %s gateway %s, want 169.254.0.21 and .22", c.GuestAddr(), c.GatewayAddr())
	}
	if got, want := c.BootIP(), "ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off"; got != want {
		t.Errorf("BootIP = %q, want %q", got, want)
	}
	big, _ := ParseConfig("10.0.0.0/8", DefaultGuestCIDR, DefaultGuestMAC, false, "abc123")
	if n := big.HostVeth(big.Slots() - 1); len(n) > maxLinkName {
		t.Errorf("largest host veth name %q is %d characters, over %d", n, len(n), maxLinkName)
	}
	// The test harness recognises VM links on the host by their name.
	for _, n := range []string{c.HostVeth(0), c.HostVeth(0x2a), big.HostVeth(big.Slots() - 1)} {
		if !testenv.IsVMHostLink(n) {
			t.Errorf("testenv.IsVMHostLink(%q) = false: the host-link check would miss this VM's veth", n)
		}
	}
	if s, ok := slotOfName(c.HostVeth(0x2a), c.linkPrefix()); !ok || s != 0x2a {
		t.Errorf("slotOfName(%s) = %d, %v", c.HostVeth(0x2a), s, ok)
	}
	if _, ok := slotOfName("fkabc123-02a", c.linkPrefix()); ok {
		t.Error("slotOfName accepted a non-canonical slot (leading zero)")
	}
	if Tag("/var/lib/forkd") == Tag("/var/lib/forkd2") || len(Tag("/x")) != 6 {
		t.Error("Tag: want 6 hex digits, different per data dir")
	}
	// The test harness tells whose a VM's namespace is by the tag in its
	// name (testenv.Main's check for leftovers).
	if tag := Tag("/var/lib/forkd"); testenv.DataDirTag("/var/lib/forkd") != tag {
		t.Errorf("testenv.DataDirTag = %q, Tag = %q: the leftover check would not know a data dir's objects", testenv.DataDirTag("/var/lib/forkd"), tag)
	}
	for _, slot := range []int{0, 0x2a, big.Slots() - 1} {
		if tag, ok := testenv.VMNamespaceTag(big.Namespace(slot)); !ok || tag != "abc123" {
			t.Errorf("testenv.VMNamespaceTag(%q) = %q, %v; want abc123", big.Namespace(slot), tag, ok)
		}
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

func TestParsePublishTakesDockerSyntax(t *testing.T) {
	for _, tc := range []struct{ in, want, err string }{
		{"8080:80", "8080:80/tcp", ""},
		{"8080:80/udp", "8080:80/udp", ""},
		{"127.0.0.1:8080:80", "127.0.0.1:8080:80/tcp", ""},
		{"0.0.0.0:53:53/udp", "53:53/udp", ""},
		{"80", "", "wrong number of fields"},
		{"a:80", "", "not 1-65535"},
		{"8080:0", "", "not 1-65535"},
		{"8080:70000", "", "not 1-65535"},
		{"8080:80/sctp", "", "tcp or udp"},
		{"::1:8080:80", "", "wrong number of fields"},
		{"host:8080:80", "", "not an IPv4 address"},
	} {
		p, err := ParsePublish(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParsePublish(%q) = %v, %v; want an error containing %q", tc.in, p, err, tc.err)
			}
			continue
		}
		if err != nil || p.Normalize().String() != tc.want {
			t.Errorf("ParsePublish(%q) = %v, %v; want %s", tc.in, p.Normalize(), err, tc.want)
		}
	}
	a, _ := ParsePublish("8080:80")
	b, _ := ParsePublish("127.0.0.1:8080:81")
	c, _ := ParsePublish("8080:80/udp")
	if !a.Overlaps(b) || a.Overlaps(c) {
		t.Errorf("Overlaps: every-address vs 127.0.0.1 on one port must overlap, tcp vs udp must not")
	}
}
