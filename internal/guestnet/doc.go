// Package guestnet is the network of forkd vmm's emulated guest: the
// host side of a virtio-net device (a TAP opened by name, as Firecracker
// opens it) and, behind it, the guest's own TCP/IP stack (gVisor's
// netstack) with the few services a test or a user reaches it by.
//
// It owns: opening a TAP through /dev/net/tun with Firecracker's flags,
// the guest's link endpoint on that TAP (frames flow only while the VM
// runs), the `ip=` kernel argument's meaning, and the guest's services:
// ARP and ICMP echo (the stack answers them), TCP echo on port 7 and HTTP
// on port 80 (the caller gives the handler). It knows no VMM API, no
// snapshot and no guest memory layout: the emulator decides what the guest
// remembers across a snapshot and hands it in (MACs, address), and it owns
// every TAP it opens.
//
// It must never create a host link: OpenTAP refuses a TAP that does not
// already exist (and persist) in the caller's network namespace, where a
// privileged TUNSETIFF would silently create a fresh, unconnected one.
//
// # Pausing
//
// A paused VM runs no guest code, so its stack sees no frame: the link
// stops reading the TAP (frames wait in the TAP's queue, up to its
// txqueuelen, exactly as they wait for a paused Firecracker), drops every
// frame the stack tries to send, and the stack's TCP workers are paused.
// Resume delivers what waited. The stack's own timers are wall-clock
// timers and keep running while paused, which a frozen guest's would not:
// a long pause can time out a TCP connection the guest had open.
//
// # What a snapshot keeps
//
// The stack's state lives in the VMM's Go heap, not in guest memory, so
// it is not in a snapshot: a restored guest starts a fresh stack with the
// identity the emulator read back from guest memory (MACs, address,
// gateway) and the same listeners, but no TCP connection and an empty
// neighbour cache. A real guest keeps its connections in memory; through a
// fork's new namespace they would be dead anyway (no NAT state there), but
// across a standby and restore in the same namespace a real guest's
// connection can survive where the emulated guest's is reset.
package guestnet
