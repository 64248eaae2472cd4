// Package network gives every forkd VM its own network namespace, TAP,
// veth pair, unique host-side address and NAT rules, so that every fork of a
// VM keeps the guest address and MAC it had in memory and is still reachable
// at an address of its own.
//
// It owns the kernel objects it creates (namespaces, links, addresses,
// routes, nftables tables) and nothing else: it never touches a name that
// does not carry its data dir's tag. It knows no VMs, journals or files
// beyond the named-namespace mounts: the instance manager decides when each
// VM's network is made and removed.
package network
