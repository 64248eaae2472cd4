package network_test

import (
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/network"
)

type linkState struct {
	index int
	mac   string
	up    bool
	addrs []netip.Prefix
}

func (l linkState) has(a netip.Addr, bits int) bool {
	for _, p := range l.addrs {
		if p == netip.PrefixFrom(a, bits) {
			return true
		}
	}
	return false
}

type routeState struct {
	dst, gw netip.Addr
	bits    int
	dev     string
}

// nsState is what one namespace holds, read through netlink.
type nsState struct {
	links  map[string]linkState
	routes []routeState
	neigh  map[netip.Addr]string // permanent IPv4 neighbours: MAC
	tables []string              // nftables tables
}

func (s nsState) linkNames() []string {
	var out []string
	for n := range s.links {
		out = append(out, n)
	}
	return out
}

func (s nsState) defaultVia(gw netip.Addr) bool {
	for _, r := range s.routes {
		if (!r.dst.IsValid() || (r.dst.IsUnspecified() && r.bits == 0)) && r.gw == gw {
			return true
		}
	}
	return false
}

func (s nsState) routeTo(dst netip.Addr, dev string) bool {
	for _, r := range s.routes {
		if r.dst == dst && r.bits == 32 && r.dev == dev {
			return true
		}
	}
	return false
}

func snapshotNS(t *testing.T, path string) nsState {
	t.Helper()
	st := nsState{links: map[string]linkState{}, neigh: map[netip.Addr]string{}}
	err := network.Do(path, func() error {
		nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return err
		}
		defer nl.Close()
		links, err := nl.LinkList()
		if err != nil {
			return err
		}
		names := map[int]string{}
		for _, l := range links {
			a := l.Attrs()
			names[a.Index] = a.Name
			ls := linkState{index: a.Index, mac: a.HardwareAddr.String(), up: a.Flags&net.FlagUp != 0}
			addrs, err := nl.AddrList(l, unix.AF_INET)
			if err != nil {
				return err
			}
			for _, ad := range addrs {
				ip, _ := netip.AddrFromSlice(ad.IP.To4())
				bits, _ := ad.Mask.Size()
				ls.addrs = append(ls.addrs, netip.PrefixFrom(ip, bits))
			}
			st.links[a.Name] = ls
		}
		routes, err := nl.RouteList(nil, unix.AF_INET)
		if err != nil {
			return err
		}
		for _, r := range routes {
			rs := routeState{dev: names[r.LinkIndex]}
			if r.Dst != nil {
				rs.dst, _ = netip.AddrFromSlice(r.Dst.IP.To4())
				rs.bits, _ = r.Dst.Mask.Size()
			}
			if r.Gw != nil {
				rs.gw, _ = netip.AddrFromSlice(r.Gw.To4())
			}
			st.routes = append(st.routes, rs)
		}
		neighs, err := nl.NeighList(0, unix.AF_INET)
		if err != nil {
			return err
		}
		for _, n := range neighs {
			if n.State&netlink.NUD_PERMANENT != 0 {
				ip, _ := netip.AddrFromSlice(n.IP.To4())
				st.neigh[ip] = n.HardwareAddr.String()
			}
		}
		ns, err := netns.Get()
		if err != nil {
			return err
		}
		defer ns.Close()
		nc, err := nftables.New(nftables.WithNetNSFd(int(ns)))
		if err != nil {
			return err
		}
		tables, err := nc.ListTables()
		if err != nil {
			return err
		}
		for _, tb := range tables {
			st.tables = append(st.tables, tb.Name)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("read namespace %s: %v", path, err)
	}
	return st
}

// countNamespaces counts the named namespaces of one tag's VMs
// (forkd-<tag>-<slot>), never another test's.
func countNamespaces(t *testing.T, tag string) int {
	t.Helper()
	ents, err := os.ReadDir("/var/run/netns")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "forkd-"+tag+"-") {
			n++
		}
	}
	return n
}

func deleteLink(t *testing.T, ns, name string) {
	t.Helper()
	err := network.Do(ns, func() error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	})
	if err != nil {
		t.Fatalf("delete %s: %v", name, err)
	}
}
