package network

import (
	"fmt"
	"net/netip"
	"strconv"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// SlotPublishes is the publishes of one VM.
type SlotPublishes struct {
	Slot    int
	Publish []Publish
}

// Init makes the daemon's namespace ready for VMs: the host table (below)
// with every publish given, and the sysctls networking needs there. It is
// idempotent; the manager runs it before the first networked VM of a
// daemon's life, and not at all while no VM is networked.
//
// The host table, forkd_<tag> (family ip), holds every rule forkd keeps in
// the daemon's namespace; its host-side links all start with fk<tag>-:
//   - input: from a VM link, only replies to connections the host opened
//     (no VM reaches the daemon's listener, the pager, or any host service);
//   - forward: VM to VM dropped; from a VM, replies, plus new connections
//     out only when egress is on;
//   - postrouting: with egress, masquerade of VM addresses leaving by any
//     other link; masquerade of published connections from the loopback;
//   - prerouting, output: the published ports (DNAT to a VM's address).
//
// Sysctls in the daemon's namespace: net.ipv4.ip_forward=1 when egress is on
// or a port is published (both forward between links); route_localnet=1 on
// a host veth whose VM has a publish, so a connection to 127.0.0.1 can be
// DNATed to it.
func (h *Host) Init(pubs []SlotPublishes) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	nc, err := h.hostNFT()
	if err != nil {
		return err
	}
	t, ch := h.hostChains(nc)
	resetTable(nc, t)
	c := h.cfg
	vm := c.linkPrefix() + "*"
	add := func(chain *nftables.Chain, e []expr.Any) {
		nc.AddRule(&nftables.Rule{Table: t, Chain: chain, Exprs: e})
	}
	add(ch.input, rule(iif(vm), establishedOrRelated(), accept()))
	add(ch.input, rule(iif(vm), drop()))
	add(ch.forward, rule(iif(vm), oif(vm), drop()))
	add(ch.forward, rule(iif(vm), establishedOrRelated(), accept()))
	if !c.Egress {
		add(ch.forward, rule(iif(vm), drop()))
	} else {
		add(ch.postrouting, rule(ipPrefix(true, c.Pool), notOif(vm), masquerade()))
	}
	add(ch.postrouting, rule(oif(vm), ctDNAT(), ipPrefix(true, netip.MustParsePrefix("127.0.0.0/8")), masquerade()))
	published := false
	for _, sp := range pubs {
		for _, p := range sp.Publish {
			h.publishRules(nc, t, ch, sp.Slot, p)
			published = true
		}
	}
	if err := nc.Flush(); err != nil {
		return fmt.Errorf("network: host table %s: %w", c.hostTable(), err)
	}
	if c.Egress || published {
		if err := h.forwarding(); err != nil {
			return err
		}
	}
	for _, sp := range pubs {
		// A VM whose network is not made yet gets it from its own
		// AddPublishes once it is.
		if len(sp.Publish) > 0 && h.Complete(sp.Slot) {
			if err := h.routeLocalnet(sp.Slot); err != nil {
				return err
			}
		}
	}
	return nil
}

type hostChains struct{ input, forward, prerouting, output, postrouting *nftables.Chain }

// hostChains queues the host table and its base chains (no-ops when they
// exist).
func (h *Host) hostChains(nc *nftables.Conn) (*nftables.Table, hostChains) {
	t := ensureTable(nc, h.cfg.hostTable())
	acc := nftables.ChainPolicyAccept
	return t, hostChains{
		input:       baseChain(nc, t, "input", nftables.ChainTypeFilter, nftables.ChainHookInput, nftables.ChainPriorityFilter, &acc),
		forward:     baseChain(nc, t, "forward", nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter, &acc),
		prerouting:  baseChain(nc, t, "prerouting", nftables.ChainTypeNAT, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest, &acc),
		output:      baseChain(nc, t, "output", nftables.ChainTypeNAT, nftables.ChainHookOutput, nftables.ChainPriorityNATDest, &acc),
		postrouting: baseChain(nc, t, "postrouting", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource, &acc),
	}
}

// slotComment tags a publish rule with its VM's slot (an nft comment, so
// `nft list ruleset` shows it too).
func slotComment(slot int) []byte {
	return userdata.AppendString(nil, userdata.TypeComment, "forkd slot "+strconv.Itoa(slot))
}

// publishRules queues p's DNAT, for packets arriving (prerouting) and for
// the host's own connections (output).
func (h *Host) publishRules(nc *nftables.Conn, t *nftables.Table, ch hostChains, slot int, p Publish) {
	p = p.Normalize()
	dst := daddrLocal()
	if p.HostIP.IsValid() {
		dst = ipAddr(false, p.HostIP)
	}
	proto := byte(unix.IPPROTO_TCP)
	if p.Protocol == "udp" {
		proto = unix.IPPROTO_UDP
	}
	e := rule(dst, l4Port(proto, p.HostPort), dnat(h.cfg.Address(slot), p.GuestPort))
	for _, chain := range []*nftables.Chain{ch.prerouting, ch.output} {
		nc.AddRule(&nftables.Rule{Table: t, Chain: chain, Exprs: e, UserData: slotComment(slot)})
	}
}

// AddPublishes makes ps slot's publishes, replacing any it had (so adding
// the same publishes twice, as Init and a VM's own setup may, leaves one
// set of rules). The host table must exist (Init).
func (h *Host) AddPublishes(slot int, ps []Publish) error {
	if len(ps) == 0 {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	nc, err := h.hostNFT()
	if err != nil {
		return err
	}
	if err := h.queueUnpublish(nc, slot); err != nil {
		return err
	}
	t, ch := h.hostChains(nc)
	for _, p := range ps {
		h.publishRules(nc, t, ch, slot, p)
	}
	if err := nc.Flush(); err != nil {
		return fmt.Errorf("network: publish to %s: %w", h.cfg.Address(slot), err)
	}
	if err := h.forwarding(); err != nil {
		return err
	}
	return h.routeLocalnet(slot)
}

// RemovePublishes removes every publish of slot's VM. None is not an error.
func (h *Host) RemovePublishes(slot int) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	nc, err := h.hostNFT()
	if err != nil {
		return err
	}
	if err := h.queueUnpublish(nc, slot); err != nil {
		return err
	}
	if err := nc.Flush(); err != nil {
		return fmt.Errorf("network: unpublish %s: %w", h.cfg.Address(slot), err)
	}
	return nil
}

// queueUnpublish queues, in nc's batch, the removal of slot's publish
// rules. No host table yet means none.
func (h *Host) queueUnpublish(nc *nftables.Conn, slot int) error {
	t := &nftables.Table{Name: h.cfg.hostTable(), Family: nftables.TableFamilyIPv4}
	want := string(slotComment(slot))
	for _, name := range []string{"prerouting", "output"} {
		rules, err := nc.GetRules(t, &nftables.Chain{Name: name, Table: t})
		if err != nil {
			return nil // no table (or chain) yet: nothing was ever published
		}
		for _, r := range rules {
			if string(r.UserData) == want {
				if err := nc.DelRule(r); err != nil {
					return fmt.Errorf("network: unpublish %s: %w", h.cfg.Address(slot), err)
				}
			}
		}
	}
	return nil
}

// RemoveHostTable deletes the host table, if there is one: the
// reconciler's cleanup when no record needs networking any more. Without
// one it only reads.
func (h *Host) RemoveHostTable() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	nc, err := h.hostNFT()
	if err != nil {
		return err
	}
	t, err := nc.ListTableOfFamily(h.cfg.hostTable(), nftables.TableFamilyIPv4)
	if err != nil || t == nil {
		return nil // none (or nf_tables unreadable: then none of ours either)
	}
	nc.DelTable(t)
	if err := nc.Flush(); err != nil {
		return fmt.Errorf("network: remove host table %s: %w", h.cfg.hostTable(), err)
	}
	return nil
}

func (h *Host) forwarding() error {
	return h.inDaemonNS(func() error { return writeSysctl("net/ipv4/ip_forward", "1") })
}

func (h *Host) routeLocalnet(slot int) error {
	return h.inDaemonNS(func() error {
		return writeSysctl("net/ipv4/conf/"+h.cfg.HostVeth(slot)+"/route_localnet", "1")
	})
}
