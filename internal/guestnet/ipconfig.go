package guestnet

import (
	"fmt"
	"net/netip"
	"strings"
)

// IPConfig is the static configuration the Linux kernel takes from its
// `ip=` boot argument (Documentation/admin-guide/nfs/nfsroot.rst):
//
//	ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>:...
//
// Only static configuration is meaningful here (the emulated guest has no
// DHCP, BOOTP or RARP client).
type IPConfig struct {
	Address  netip.Prefix // client-ip with the netmask's length
	Gateway  netip.Addr   // invalid when gw-ip is empty
	Hostname string
	// Device is the guest interface name (eth0 is the first virtio-net
	// device); empty means the first one, as the kernel does with a single
	// device.
	Device string
}

// NIC returns the index of the NIC (of n, named eth0...) the address goes
// on: the one Device names, or the first when Device is empty. A device the
// guest does not have gets no address, as in Linux.
func (c *IPConfig) NIC(n int) (int, bool) {
	if c.Device == "" {
		return 0, n > 0
	}
	for i := range n {
		if c.Device == fmt.Sprintf("eth%d", i) {
			return i, true
		}
	}
	return 0, false
}

// ParseIPArg reads the last `ip=` word of a kernel command line (the
// kernel's last one wins). It returns nil when there is none, or when it
// says off/none. A form the emulated guest cannot honour (autoconfiguration,
// a malformed address or netmask) is an error, so a typo is refused rather
// than booting a guest with no address.
func ParseIPArg(cmdline string) (*IPConfig, error) {
	val, found := "", false
	for _, w := range strings.Fields(cmdline) {
		if v, ok := strings.CutPrefix(w, "ip="); ok {
			val, found = v, true
		}
	}
	if !found {
		return nil, nil
	}
	switch val {
	case "off", "none":
		return nil, nil
	case "", "on", "any", "dhcp", "bootp", "rarp", "both":
		return nil, fmt.Errorf("boot_args: ip=%s asks for autoconfiguration, which forkd vmm's guest does not do; give a static ip=<client-ip>::<gw-ip>:<netmask>::<device>:off", val)
	}
	f := strings.Split(val, ":")
	for len(f) < 7 {
		f = append(f, "")
	}
	field := func(i int) string { return f[i] }
	switch field(6) {
	case "", "off", "none":
	default:
		return nil, fmt.Errorf("boot_args: ip= autoconf %q is not supported by forkd vmm's guest (only off or none)", field(6))
	}
	addr, err := netip.ParseAddr(field(0))
	if err != nil || !addr.Is4() {
		return nil, fmt.Errorf("boot_args: ip= client address %q is not an IPv4 address", field(0))
	}
	if field(1) != "" {
		if a, err := netip.ParseAddr(field(1)); err != nil || !a.Is4() {
			return nil, fmt.Errorf("boot_args: ip= server address %q is not an IPv4 address", field(1))
		}
	}
	cfg := &IPConfig{Hostname: field(4), Device: field(5)}
	if field(2) != "" {
		gw, err := netip.ParseAddr(field(2))
		if err != nil || !gw.Is4() {
			return nil, fmt.Errorf("boot_args: ip= gateway %q is not an IPv4 address", field(2))
		}
		cfg.Gateway = gw
	}
	bits := classfulBits(addr)
	if field(3) != "" {
		m, err := netip.ParseAddr(field(3))
		if err != nil || !m.Is4() {
			return nil, fmt.Errorf("boot_args: ip= netmask %q is not a dotted IPv4 netmask", field(3))
		}
		if bits = maskBits(m.As4()); bits < 0 {
			return nil, fmt.Errorf("boot_args: ip= netmask %s is not contiguous", field(3))
		}
	}
	cfg.Address = netip.PrefixFrom(addr, bits)
	if cfg.Gateway.IsValid() && !cfg.Address.Masked().Contains(cfg.Gateway) {
		return nil, fmt.Errorf("boot_args: ip= gateway %s is outside the guest's subnet %s", cfg.Gateway, cfg.Address.Masked())
	}
	return cfg, nil
}

// classfulBits is the kernel's default netmask when ip= gives none.
func classfulBits(a netip.Addr) int {
	switch b := a.As4()[0]; {
	case b < 128:
		return 8
	case b < 192:
		return 16
	default:
		return 24
	}
}

// maskBits is the prefix length of a contiguous netmask, or -1.
func maskBits(m [4]byte) int {
	v := uint32(m[0])<<24 | uint32(m[1])<<16 | uint32(m[2])<<8 | uint32(m[3])
	n := 0
	for v&(1<<31) != 0 {
		v <<= 1
		n++
	}
	if v != 0 {
		return -1
	}
	return n
}
