package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Ensure makes slot's network complete, whatever part of it exists: its
// namespace with the TAP (gateway address, fixed MAC, a permanent neighbour
// entry for the guest), the veth pair with the VM's address inside and a
// route to it outside, IP forwarding and the NAT table inside. It is
// idempotent, so the reconciler uses it to repair a half-made network or
// re-create one a host reboot removed; it never removes a TAP a running VMM
// holds.
func (h *Host) Ensure(slot int) error {
	if slot < 0 || slot >= h.cfg.Slots() {
		return fmt.Errorf("network slot %d: outside the pool %s (%d slots)", slot, h.cfg.Pool, h.cfg.Slots())
	}
	// The host veth is moved into the namespace h.daemon names.
	if err := h.checkDaemonNS(); err != nil {
		return err
	}
	path := h.cfg.NamespacePath(slot)
	var err error
	if isNamespace(path) {
		err = inNamespace(path, func(ns netns.NsHandle) error { return h.inside(ns, slot, false) })
	} else {
		// A bare file is what a crash between creating and mounting leaves.
		if rerr := removeNamespace(path); rerr != nil {
			return rerr
		}
		// A host veth without its namespace is stale: its peer went with the
		// namespace, so the name must be freed first.
		if derr := h.delHostVeth(slot); derr != nil {
			return derr
		}
		err = inNewNamespace(path, func(ns netns.NsHandle) error { return h.inside(ns, slot, true) })
	}
	if err != nil {
		return fmt.Errorf("network %s: %w", h.cfg.Namespace(slot), err)
	}
	if err := h.syncCarrier(h.cfg.HostVeth(slot)); err != nil {
		return fmt.Errorf("network %s: %w", h.cfg.Namespace(slot), err)
	}
	return nil
}

// PrepareTAP takes slot's TAP down. Call it before a VMM opens the TAP; call
// ActivateTAP once it has. A TAP's carrier comes on when a VMM attaches, and
// the kernel starts its transmit queue only on a later, asynchronous link
// event if the TAP is already up then; until that event runs every packet
// to the guest is dropped, so a restored fork's first request could be
// lost. Brought up after the attach, the TAP starts its queue within the
// call.
func (h *Host) PrepareTAP(slot int) error { return h.setTAP(slot, false) }

// ActivateTAP brings slot's TAP up once its VMM has opened it (see
// PrepareTAP): before a restored VM resumes, right after a boot.
func (h *Host) ActivateTAP(slot int) error { return h.setTAP(slot, true) }

func (h *Host) setTAP(slot int, up bool) error {
	err := inNamespace(h.cfg.NamespacePath(slot), func(netns.NsHandle) error {
		nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return err
		}
		defer nl.Close()
		tap, err := nl.LinkByName(TapName)
		if err != nil {
			return err
		}
		if up {
			return nl.LinkSetUp(tap)
		}
		return nl.LinkSetDown(tap)
	})
	if err != nil {
		return fmt.Errorf("network %s: %s up=%v: %w", h.cfg.Namespace(slot), TapName, up, err)
	}
	return nil
}

// inside runs on a thread in slot's namespace (ns). fresh: the namespace
// was just made, so nothing in it needs checking.
func (h *Host) inside(ns netns.NsHandle, slot int, fresh bool) error {
	c := h.cfg
	nl, err := netlink.NewHandle(unix.NETLINK_ROUTE) // sockets in this thread's namespace
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer nl.Close()
	// No IPv6 on these links: the guest speaks IPv4, and a link-local
	// address would only add router solicitations and DAD noise.
	for _, k := range []string{"net/ipv6/conf/default/disable_ipv6", "net/ipv6/conf/all/disable_ipv6"} {
		if err := writeSysctl(k, "1"); err != nil && !errors.Is(err, unix.ENOENT) {
			return err
		}
	}
	if err := writeSysctl("net/ipv4/ip_forward", "1"); err != nil {
		return err
	}
	if err := nl.LinkSetUp(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: 1}}); err != nil { // lo
		return fmt.Errorf("lo up: %w", err)
	}

	// The TAP, persistent and owned by root, is what the VMM opens by name.
	tap, err := h.link(nl, TapName, fresh)
	if err != nil {
		return err
	}
	if tap == nil {
		t := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: TapName}, Mode: netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_NO_PI}
		if err := nl.LinkAdd(t); err != nil {
			return fmt.Errorf("create %s: %w", TapName, err)
		}
		if tap, err = nl.LinkByName(TapName); err != nil {
			return fmt.Errorf("%s: %w", TapName, err)
		}
	}
	if err := nl.LinkSetHardwareAddr(tap, c.GatewayMAC()); err != nil {
		return fmt.Errorf("%s: set MAC: %w", TapName, err)
	}
	if err := nl.AddrReplace(tap, addrOf(c.GatewayAddr(), c.Guest.Bits())); err != nil {
		return fmt.Errorf("%s: address: %w", TapName, err)
	}
	// The TAP stays down until its VMM has opened it (ActivateTAP).
	// The guest's MAC is known and never changes: a permanent entry spares
	// a restored fork's first packet an ARP round trip to a guest that has
	// only just been resumed.
	if err := nl.NeighSet(&netlink.Neigh{LinkIndex: tap.Attrs().Index, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
		IP: c.GuestAddr().AsSlice(), HardwareAddr: c.GuestMAC}); err != nil {
		return fmt.Errorf("%s: guest neighbour: %w", TapName, err)
	}

	// The veth pair: created from inside, its peer lands directly in the
	// daemon's namespace under the slot's host-side name.
	veth, err := h.link(nl, NSVethName, fresh)
	if err != nil {
		return err
	}
	if veth == nil {
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: NSVethName, HardwareAddr: nsVethMAC}, PeerName: c.HostVeth(slot),
			PeerHardwareAddr: hostVethMAC(slot), PeerNamespace: netlink.NsFd(h.daemon)}
		if err := nl.LinkAdd(v); err != nil {
			return fmt.Errorf("create veth %s/%s: %w", NSVethName, c.HostVeth(slot), err)
		}
		if veth, err = nl.LinkByName(NSVethName); err != nil {
			return fmt.Errorf("%s: %w", NSVethName, err)
		}
	}
	if err := nl.AddrReplace(veth, addrOf(c.Address(slot), 32)); err != nil {
		return fmt.Errorf("%s: address: %w", NSVethName, err)
	}
	// The host end first, then this one: a link opened while its peer is
	// already up gets its carrier and its transmit queue at once, in the
	// same call; the host end's queue is then activated by a kernel link
	// event, which Ensure then waits for (syncCarrier).
	if err := h.outside(slot); err != nil {
		return err
	}
	if err := nl.LinkSetUp(veth); err != nil {
		return fmt.Errorf("%s up: %w", NSVethName, err)
	}
	host := c.HostAddr()
	if err := nl.NeighSet(&netlink.Neigh{LinkIndex: veth.Attrs().Index, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
		IP: host.AsSlice(), HardwareAddr: hostVethMAC(slot)}); err != nil {
		return fmt.Errorf("%s: host neighbour: %w", NSVethName, err)
	}
	if err := nl.RouteReplace(&netlink.Route{LinkIndex: veth.Attrs().Index, Dst: hostRoute(host), Scope: netlink.SCOPE_LINK}); err != nil {
		return fmt.Errorf("route to %s: %w", host, err)
	}
	if err := nl.RouteReplace(&netlink.Route{LinkIndex: veth.Attrs().Index, Gw: host.AsSlice(), Src: c.Address(slot).AsSlice()}); err != nil {
		return fmt.Errorf("default route via %s: %w", host, err)
	}

	nc, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	c.nsRules(nc, slot)
	if err := nc.Flush(); err != nil {
		return fmt.Errorf("nftables table %s: %w", nftTable, err)
	}
	return nil
}

// link looks a link up by name; nil when it does not exist (or, fresh, is
// known not to).
func (h *Host) link(nl *netlink.Handle, name string, fresh bool) (netlink.Link, error) {
	if fresh {
		return nil, nil
	}
	l, err := nl.LinkByName(name)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return l, nil
}

// outside configures slot's veth end in the daemon's namespace: the shared
// host address, up, and a route to the VM's address.
func (h *Host) outside(slot int) error {
	c := h.cfg
	name := c.HostVeth(slot)
	l, err := h.nl.LinkByName(name)
	if err != nil {
		return fmt.Errorf("host veth %s: %w", name, err)
	}
	if err := h.nl.AddrReplace(l, addrOf(c.HostAddr(), 32)); err != nil {
		return fmt.Errorf("host veth %s: address: %w", name, err)
	}
	if err := h.nl.LinkSetUp(l); err != nil {
		return fmt.Errorf("host veth %s up: %w", name, err)
	}
	if err := h.nl.NeighSet(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
		IP: c.Address(slot).AsSlice(), HardwareAddr: nsVethMAC}); err != nil {
		return fmt.Errorf("host veth %s: VM neighbour: %w", name, err)
	}
	if err := h.nl.RouteReplace(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: hostRoute(c.Address(slot)),
		Scope: netlink.SCOPE_LINK, Src: c.HostAddr().AsSlice()}); err != nil {
		return fmt.Errorf("route to %s: %w", c.Address(slot), err)
	}
	return nil
}

// Remove deletes slot's network: its host veth (with the route through it;
// the peer goes too) and its namespace (with the TAP and the table inside).
// What is already gone is not an error.
func (h *Host) Remove(slot int) error {
	err := h.delHostVeth(slot)
	if rerr := removeNamespace(h.cfg.NamespacePath(slot)); rerr != nil {
		err = errors.Join(err, rerr)
	}
	if err != nil {
		return fmt.Errorf("network %s: %w", h.cfg.Namespace(slot), err)
	}
	return nil
}

func (h *Host) delHostVeth(slot int) error {
	l, err := h.nl.LinkByName(h.cfg.HostVeth(slot))
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("host veth %s: %w", h.cfg.HostVeth(slot), err)
	}
	if err := h.nl.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete host veth %s: %w", h.cfg.HostVeth(slot), err)
	}
	return nil
}

// Present lists the slots that have any object of this tag on the host (a
// namespace, or a host veth): what the reconciler compares with its
// records.
func (h *Host) Present() (map[int]bool, error) {
	out, err := h.cfg.namespaceSlots()
	if err != nil {
		return nil, err
	}
	links, err := h.nl.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	for _, l := range links {
		if s, ok := slotOfName(l.Attrs().Name, h.cfg.linkPrefix()); ok {
			out[s] = true
		}
	}
	return out, nil
}

// Complete reports whether slot's network looks whole from the daemon's
// namespace: its namespace mounted and its host veth up. (Ensure repairs
// the inside; this is the cheap check the reconciler runs for every VM.)
func (h *Host) Complete(slot int) bool {
	if !isNamespace(h.cfg.NamespacePath(slot)) {
		return false
	}
	l, err := h.nl.LinkByName(h.cfg.HostVeth(slot))
	return err == nil && l.Attrs().Flags&net.FlagUp != 0
}

func addrOf(a netip.Addr, bits int) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, 32)}}
}

func hostRoute(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(32, 32)}
}
