package network

import (
	"encoding/binary"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// This file builds nftables rules as expressions (there is no nft binary at
// run time). Each helper returns the expressions of one match or action, in
// the order nft itself would compile it; a rule is their concatenation.

// ifname matches an interface name exactly (the kernel compares the whole
// 16-byte, NUL-padded name).
func ifname(name string) []byte {
	b := make([]byte, 16)
	copy(b, name)
	return b
}

// matchIface matches the input (in) or output interface against name; a
// name ending in "*" is a prefix match, as in nft.
func matchIface(in bool, name string, op expr.CmpOp) []expr.Any {
	key := expr.MetaKeyOIFNAME
	if in {
		key = expr.MetaKeyIIFNAME
	}
	data := ifname(name)
	if n := len(name); n > 0 && name[n-1] == '*' {
		data = []byte(name[:n-1])
	}
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: data},
	}
}

func iif(name string) []expr.Any    { return matchIface(true, name, expr.CmpOpEq) }
func oif(name string) []expr.Any    { return matchIface(false, name, expr.CmpOpEq) }
func notOif(name string) []expr.Any { return matchIface(false, name, expr.CmpOpNeq) }

// ipAddr matches the IPv4 source (src) or destination address.
func ipAddr(src bool, a netip.Addr) []expr.Any {
	off := uint32(16)
	if src {
		off = 12
	}
	b := a.As4()
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b[:]},
	}
}

// ipPrefix matches the IPv4 source (src) or destination against a prefix.
func ipPrefix(src bool, p netip.Prefix) []expr.Any {
	off := uint32(16)
	if src {
		off = 12
	}
	mask := make([]byte, 4)
	binary.BigEndian.PutUint32(mask, ^uint32(0)<<(32-p.Bits()))
	b := p.Masked().Addr().As4()
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b[:]},
	}
}

// ctState matches conntrack states (expr.CtStateBit*).
func ctState(bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(bits), Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0, 0, 0}},
	}
}

func establishedOrRelated() []expr.Any {
	return ctState(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED)
}

// ipsDstNAT is the conntrack status bit of a destination-NATed connection.
const ipsDstNAT = 0x20

// ctDNAT matches connections whose destination was NATed.
func ctDNAT() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATUS},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(ipsDstNAT), Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0, 0, 0}},
	}
}

// l4Port matches the transport protocol and its destination port.
func l4Port(proto byte, port uint16) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
	}
}

// daddrLocal matches packets addressed to one of this namespace's own
// addresses (fib daddr type local).
func daddrLocal() []expr.Any {
	return []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
	}
}

// dnat rewrites the destination to a (and port, when non-zero).
func dnat(a netip.Addr, port uint16) []expr.Any {
	b := a.As4()
	out := []expr.Any{&expr.Immediate{Register: 1, Data: b[:]}}
	n := &expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1}
	if port != 0 {
		out = append(out, &expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(port)})
		n.RegProtoMin = 2
	}
	return append(out, n)
}

// snat rewrites the source to a.
func snat(a netip.Addr) []expr.Any {
	b := a.As4()
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: b[:]},
		&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
	}
}

func masquerade() []expr.Any { return []expr.Any{&expr.Masq{}} }
func accept() []expr.Any     { return []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}} }
func drop() []expr.Any       { return []expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}} }

// rule concatenates matches and an action.
func rule(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// baseChain adds a base chain of the given type at hook and priority.
func baseChain(c *nftables.Conn, t *nftables.Table, name string, typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority, policy *nftables.ChainPolicy) *nftables.Chain {
	return c.AddChain(&nftables.Chain{Name: name, Table: t, Type: typ, Hooknum: hook, Priority: prio, Policy: policy})
}

// ensureTable queues, in c's batch, the creation of a table of this name
// (a no-op if it exists); resetTable then empties its chains once they are
// queued too. The kernel applies the whole batch atomically, so no packet
// ever sees the table half-built. Deleting and re-creating the table would
// do the same but costs ~10 ms: removing a base chain unregisters its hook,
// which waits for an RCU grace period.
func ensureTable(c *nftables.Conn, name string) *nftables.Table {
	return c.AddTable(&nftables.Table{Name: name, Family: nftables.TableFamilyIPv4})
}

func resetTable(c *nftables.Conn, t *nftables.Table) { c.FlushTable(t) }

// nsRules builds the table inside a VM's namespace: DNAT of the VM's
// host-side address to the guest, SNAT of the guest to that address, and a
// forward chain that lets in only what was DNATed (and replies) and lets
// the guest out (the daemon's namespace decides what goes further).
func (c Config) nsRules(nc *nftables.Conn, slot int) {
	addr, guest := c.Address(slot), c.GuestAddr()
	t := ensureTable(nc, nftTable)
	accept4 := nftables.ChainPolicyAccept
	drop4 := nftables.ChainPolicyDrop
	pre := baseChain(nc, t, "prerouting", nftables.ChainTypeNAT, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest, &accept4)
	post := baseChain(nc, t, "postrouting", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource, &accept4)
	fwd := baseChain(nc, t, "forward", nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter, &drop4)
	resetTable(nc, t)
	nc.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: rule(iif(NSVethName), ipAddr(false, addr), dnat(guest, 0))})
	nc.AddRule(&nftables.Rule{Table: t, Chain: post, Exprs: rule(oif(NSVethName), ipAddr(true, guest), snat(addr))})
	nc.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: rule(establishedOrRelated(), accept())})
	nc.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: rule(iif(NSVethName), oif(TapName), ctDNAT(), accept())})
	nc.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: rule(iif(TapName), oif(NSVethName), accept())})
}
