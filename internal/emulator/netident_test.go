package emulator

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/guestnet"
)

// TestGuestIdentityRoundTripsThroughGuestMemory: what a booting guest
// writes into page 0 is what a loaded guest reads back; a page without the
// block, or with a corrupt one, yields no identity.
func TestGuestIdentityRoundTripsThroughGuestMemory(t *testing.T) {
	ip, err := guestnet.ParseIPArg("ip=169.254.0.21::169.254.0.22:255.255.255.252::eth1:off")
	if err != nil {
		t.Fatal(err)
	}
	id, err := bootIdentity([]netIface{{IfaceID: "a", GuestMAC: "02:fc:00:00:00:05"}, {IfaceID: "b"}}, ip)
	if err != nil {
		t.Fatal(err)
	}
	if id.macs[1][0]&3 != 2 {
		t.Fatalf("generated MAC %s is not unicast and locally administered", id.macs[1])
	}
	page := make([]byte, pageSize)
	id.write(page)
	got, err := readIdentity(page)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.macs) != 2 || got.macs[0].String() != "02:fc:00:00:00:05" || got.macs[1].String() != id.macs[1].String() {
		t.Fatalf("MACs read back %v, written %v", got.macs, id.macs)
	}
	want := guestnet.IPConfig{Address: netip.MustParsePrefix("169.254.0.21/30"), Gateway: netip.MustParseAddr("169.254.0.22"), Device: "eth1"}
	if got.ip == nil || *got.ip != want {
		t.Fatalf("address read back %+v, want %+v", got.ip, want)
	}

	if _, err := readIdentity(make([]byte, pageSize)); err == nil || !strings.Contains(err.Error(), "no network identity") {
		t.Fatalf("a page without the block: %v, want no network identity", err)
	}
	bad := append([]byte(nil), page...)
	bad[hNet+9] = 5 // the address on a NIC the guest does not have
	if _, err := readIdentity(bad); err == nil {
		t.Fatal("an identity naming NIC 5 of 2 was accepted")
	}
	if _, err := bootIdentity(make([]netIface, maxGuestNICs+1), nil); err == nil {
		t.Fatalf("%d NICs accepted; the identity block holds %d", maxGuestNICs+1, maxGuestNICs)
	}
}
