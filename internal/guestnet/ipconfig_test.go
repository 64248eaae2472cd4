package guestnet

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParseIPArgReadsTheKernelsStaticForm(t *testing.T) {
	for _, tc := range []struct {
		cmdline string
		want    *IPConfig // nil: no address
		err     string
	}{
		{"console=ttyS0", nil, ""},
		{"ip=off", nil, ""},
		{"ip=none", nil, ""},
		{"ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off",
			&IPConfig{Address: netip.MustParsePrefix("169.254.0.21/30"), Gateway: netip.MustParseAddr("169.254.0.22"), Device: "eth0"}, ""},
		// The last ip= wins, as in the kernel.
		{"ip=10.0.0.2::10.0.0.1:255.0.0.0::eth0:off quiet ip=192.168.1.5:::255.255.255.0:vm1:eth1",
			&IPConfig{Address: netip.MustParsePrefix("192.168.1.5/24"), Hostname: "vm1", Device: "eth1"}, ""},
		// No netmask: the kernel's classful default.
		{"ip=169.254.0.21", &IPConfig{Address: netip.MustParsePrefix("169.254.0.21/16")}, ""},
		{"ip=10.1.2.3", &IPConfig{Address: netip.MustParsePrefix("10.1.2.3/8")}, ""},
		{"ip=dhcp", nil, "autoconfiguration"},
		{"ip=", nil, "autoconfiguration"},
		{"ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:dhcp", nil, "autoconf"},
		{"ip=169.254.0.300", nil, "client address"},
		{"ip=fe80::1", nil, "client address"},
		{"ip=169.254.0.21::gw:255.255.255.252", nil, "gateway"},
		{"ip=169.254.0.21:::255.0.255.0", nil, "not contiguous"},
		{"ip=169.254.0.21:::mask", nil, "netmask"},
		{"ip=169.254.0.21::10.0.0.1:255.255.255.252", nil, "outside the guest's subnet"},
	} {
		got, err := ParseIPArg(tc.cmdline)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseIPArg(%q) = %+v, %v; want an error containing %q", tc.cmdline, got, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseIPArg(%q): %v", tc.cmdline, err)
			continue
		}
		if (got == nil) != (tc.want == nil) || got != nil && *got != *tc.want {
			t.Errorf("ParseIPArg(%q) = %+v, want %+v", tc.cmdline, got, tc.want)
		}
	}
}

func TestIPConfigGoesOnTheNamedNICOrNone(t *testing.T) {
	for _, tc := range []struct {
		device string
		nics   int
		want   int
		ok     bool
	}{
		{"", 1, 0, true},
		{"", 0, 0, false},
		{"eth0", 2, 0, true},
		{"eth1", 2, 1, true},
		{"eth2", 2, 0, false}, // Linux boots without an address
		{"ens3", 1, 0, false},
	} {
		c := &IPConfig{Device: tc.device}
		if got, ok := c.NIC(tc.nics); got != tc.want || ok != tc.ok {
			t.Errorf("device %q of %d NICs: NIC %d %v, want %d %v", tc.device, tc.nics, got, ok, tc.want, tc.ok)
		}
	}
}
