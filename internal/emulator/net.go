package emulator

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"

	"github.com/forkd/forkd/internal/guestnet"
)

// The net devices, as Firecracker has them: a device per PUT
// /network-interfaces, whose TAP is opened when the device is built (at the
// PUT, or at a snapshot load) and held until the process exits.

// maxGuestNICs is how many NICs the guest's identity block in page 0 holds.
const maxGuestNICs = 16

func netConfigFault(format string, args ...any) error {
	return faultf("Network config error: "+format, args...)
}

// putNetIface is PUT /network-interfaces/{id}, pre-boot only. As
// Firecracker's NetBuilder::build: a guest_mac another interface uses is
// refused; an existing interface of the same id is removed first (its TAP
// closed; the last device takes its slot), then the new TAP is opened, so
// a failed open leaves the old device gone.
func (v *vmm) putNetIface(n netIface) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.preBoot(); err != nil {
		return err
	}
	if n.MTU != 0 && (n.MTU < 68 || n.MTU > 65535) {
		return faultf("invalid mtu %d: must be within 68..65535", n.MTU)
	}
	if n.GuestMAC != "" {
		for _, old := range v.ifaces {
			if old.GuestMAC == n.GuestMAC && old.IfaceID != n.IfaceID {
				return netConfigFault("The MAC address is already in use: %s", n.GuestMAC)
			}
		}
	}
	for i, old := range v.ifaces {
		if old.IfaceID == n.IfaceID {
			v.log.Warn("replacing an existing network device; its previous configuration is destroyed", "iface_id", n.IfaceID)
			v.taps[i].Close()
			last := len(v.ifaces) - 1
			v.ifaces[i], v.taps[i] = v.ifaces[last], v.taps[last]
			v.ifaces, v.taps = v.ifaces[:last], v.taps[:last]
			break
		}
	}
	v.configured = true
	tap, err := guestnet.OpenTAP(n.HostDevName)
	if err != nil {
		return netConfigFault("Could not create the network device: Open tap device failed: %v", err)
	}
	v.ifaces, v.taps = append(v.ifaces, n), append(v.taps, tap)
	v.log.Info("network device", "iface_id", n.IfaceID, "tap", n.HostDevName, "guest_mac", string(n.GuestMAC))
	return nil
}

// netIfaceUpdate is PATCH /network-interfaces/{id}: only the rate limiters.
type netIfaceUpdate struct {
	IfaceID       *string         `json:"iface_id"`
	RxRateLimiter json.RawMessage `json:"rx_rate_limiter"`
	TxRateLimiter json.RawMessage `json:"tx_rate_limiter"`
}

// patchNetIface is PATCH /network-interfaces/{id}, post-boot only. The
// limiters are recorded (GET /vm/config, the vmstate) but, as every rate
// limiter of forkd vmm, not enforced.
func (v *vmm) patchNetIface(u netIfaceUpdate) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.postBoot(); err != nil {
		return err
	}
	for i := range v.ifaces {
		if v.ifaces[i].IfaceID == *u.IfaceID {
			if u.RxRateLimiter != nil {
				v.ifaces[i].RxRateLimiter = u.RxRateLimiter
			}
			if u.TxRateLimiter != nil {
				v.ifaces[i].TxRateLimiter = u.TxRateLimiter
			}
			return nil
		}
	}
	return netConfigFault("Unable to update the net device: Failed perform action on device: Device not found")
}

// openTAPs opens the TAP of every interface a snapshot restores, by the
// name its state holds (after network_overrides), in this process's network
// namespace, as Firecracker's Net::restore.
func openTAPs(ifaces []netIface) ([]*guestnet.TAP, error) {
	taps := make([]*guestnet.TAP, 0, len(ifaces))
	for _, n := range ifaces {
		tap, err := guestnet.OpenTAP(n.HostDevName)
		if err != nil {
			closeTAPs(taps)
			return nil, faultf("Failed to restore from snapshot: Failed to build microVM from snapshot: net device %s: Open tap device failed: %v", n.IfaceID, err)
		}
		taps = append(taps, tap)
	}
	return taps, nil
}

func closeTAPs(taps []*guestnet.TAP) {
	for _, t := range taps {
		t.Close()
	}
}

// guestIdentity is what the guest's "kernel" knows of its network: the MAC
// of each NIC (eth0, eth1, ... in device order) and the static address of
// ip=. It is decided at boot, written into guest memory and read back from
// guest memory when a loaded guest first runs, so a fork's identity is, as
// a real guest's, whatever its memory holds; restoring changes nothing.
type guestIdentity struct {
	macs []net.HardwareAddr
	ip   *guestnet.IPConfig
}

// Layout of the identity block at hNet in page 0 (little endian):
//
//	0  magic "FKDNET01"
//	8  u8 NIC count, u8 index of the NIC ip= configured (0xff: none),
//	   u8 prefix length, u8 flags (1: a gateway)
//	12 address [4]byte
//	16 gateway [4]byte
//	20 reserved [4]byte
//	24 MACs: maxGuestNICs × 8 bytes (6 used)
const (
	netMagic     uint64 = 0x31305445_4e444b46 // "FKDNET01"
	netNoIP             = 0xff
	netHasGW            = 1
	netMACs             = 24
	netBlockSize        = netMACs + maxGuestNICs*8
)

// bootIdentity decides a booting guest's identity: the configured MAC of
// each interface, or a random locally administered one (what the virtio-net
// driver does when the device offers no MAC), and ip=.
func bootIdentity(ifaces []netIface, ip *guestnet.IPConfig) (guestIdentity, error) {
	if len(ifaces) > maxGuestNICs {
		return guestIdentity{}, faultf("Cannot start microvm: forkd vmm's guest supports at most %d network interfaces, %d are configured", maxGuestNICs, len(ifaces))
	}
	id := guestIdentity{ip: ip}
	for _, n := range ifaces {
		hw, ok := parseMAC(string(n.GuestMAC))
		if !ok {
			hw = make(net.HardwareAddr, 6)
			rand.Read(hw)
			hw[0] = hw[0]&^1 | 2 // unicast, locally administered
		}
		id.macs = append(id.macs, hw)
	}
	return id, nil
}

// write stores the identity in page 0.
func (id guestIdentity) write(h []byte) {
	b := h[hNet : hNet+netBlockSize]
	clear(b)
	le.PutUint64(b[0:], netMagic)
	b[8] = byte(len(id.macs))
	b[9] = netNoIP
	if idx, ok := id.ipNIC(); ok {
		b[9] = byte(idx)
		b[10] = byte(id.ip.Address.Bits())
		a := id.ip.Address.Addr().As4()
		copy(b[12:16], a[:])
		if id.ip.Gateway.IsValid() {
			b[11] |= netHasGW
			g := id.ip.Gateway.As4()
			copy(b[16:20], g[:])
		}
	}
	for i, m := range id.macs {
		copy(b[netMACs+8*i:], m)
	}
}

// ipNIC is the NIC ip= configures, if the guest has it.
func (id guestIdentity) ipNIC() (int, bool) {
	if id.ip == nil {
		return 0, false
	}
	return id.ip.NIC(len(id.macs))
}

// readIdentity reads the identity block of page 0. A page without one (a
// guest that never had the block) has no network identity.
func readIdentity(h []byte) (guestIdentity, error) {
	b := h[hNet : hNet+netBlockSize]
	if le.Uint64(b[0:]) != netMagic {
		return guestIdentity{}, fmt.Errorf("guest memory holds no network identity (magic %#x)", le.Uint64(b[0:]))
	}
	n := int(b[8])
	if n > maxGuestNICs {
		return guestIdentity{}, fmt.Errorf("guest network identity: %d NICs (at most %d)", n, maxGuestNICs)
	}
	var id guestIdentity
	for i := range n {
		id.macs = append(id.macs, append(net.HardwareAddr(nil), b[netMACs+8*i:netMACs+8*i+6]...))
	}
	if b[9] != netNoIP {
		if int(b[9]) >= n || b[10] > 32 {
			return guestIdentity{}, fmt.Errorf("guest network identity: address on NIC %d of %d, prefix /%d", b[9], n, b[10])
		}
		id.ip = &guestnet.IPConfig{Device: fmt.Sprintf("eth%d", b[9]),
			Address: netip.PrefixFrom(netip.AddrFrom4([4]byte(b[12:16])), int(b[10]))}
		if b[11]&netHasGW != 0 {
			id.ip.Gateway = netip.AddrFrom4([4]byte(b[16:20]))
		}
	}
	return id, nil
}

// startGuestNet builds the guest's stack on the open TAPs with the
// identity its memory holds. Called with v.mu held when a guest first runs
// in this process (InstanceStart, or the first resume after a load); the
// caller then runs it.
func (v *vmm) startGuestNet(id guestIdentity) error {
	if len(v.taps) == 0 {
		return nil
	}
	if len(id.macs) != len(v.taps) {
		// Memory and vmstate from different VMs: the guest knows other NICs
		// than the devices it has. Like a guest whose devices changed under
		// it, it drives only the NICs it knows.
		v.log.Error("guest network identity does not match the devices", "guest_nics", len(id.macs), "devices", len(v.taps))
	}
	nics := make([]guestnet.NIC, 0, len(v.taps))
	for i, tap := range v.taps {
		if i >= len(id.macs) {
			break
		}
		nics = append(nics, guestnet.NIC{TAP: tap, MAC: id.macs[i], MTU: uint32(v.ifaces[i].MTU)})
	}
	g, err := guestnet.Start(guestnet.Config{NICs: nics, IP: id.ip, HTTP: v.guestHTTP(), Log: v.log.With("guest", "net")})
	if err != nil {
		return err
	}
	v.guestNet = g
	attrs := []any{"nics", len(nics)}
	if idx, ok := id.ipNIC(); ok {
		attrs = append(attrs, "address", id.ip.Address.String(), "device", fmt.Sprintf("eth%d", idx), "mac", id.macs[idx].String())
	}
	v.log.Info("guest network up", attrs...)
	return nil
}

// guestHTTP is the guest's web server on port 80: GET / answers what GET
// /guest answers (boot_id and the workload's counters).
func (v *vmm) guestHTTP() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		st, err := v.guestStats()
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		writeJSON(w, st)
	})
	return mux
}
