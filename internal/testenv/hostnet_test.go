package testenv_test

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/network/nettest"
	"github.com/forkd/forkd/internal/testenv"
)

// TestMain is the check on this package itself.
func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

// TestNetWatchCatchesVMLinks is the twin of Main's check: in a namespace
// the test made (never the host's), a VM host link that comes and goes and
// one that stays are both reported; a link that was there before, and
// links not named like a VM's, are not; and a watch over a namespace where
// nothing happens reports nothing.
func TestNetWatchCatchesVMLinks(t *testing.T) {
	ns := nettest.Namespace(t)
	addVeth := func(name, peer string) {
		t.Helper()
		if err := network.Do(ns, func() error {
			return netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: peer})
		}); err != nil {
			t.Fatal(err)
		}
	}
	delLink := func(name string) {
		t.Helper()
		if err := network.Do(ns, func() error {
			l, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			return netlink.LinkDel(l)
		}); err != nil {
			t.Fatal(err)
		}
	}
	addVeth("fkc0ffee-9", "pre-peer") // there before the watch

	quiet, err := testenv.WatchNetwork(ns)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := quiet.Stop(); err != nil || len(got) != 0 {
		t.Fatalf("a watch over an unchanged namespace reports %v (%v); want nothing", got, err)
	}

	w, err := testenv.WatchNetwork(ns)
	if err != nil {
		t.Fatal(err)
	}
	addVeth("fkabcdef-0", "p0") // comes and goes
	delLink("fkabcdef-0")
	addVeth("fkabcdef-1a", "p1") // stays
	addVeth("fkt-abc-1", "p2")   // a testnet name, not a VM's
	got, err := w.Stop()
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"fkabcdef-0", "fkabcdef-1a"}; !slices.Equal(got, want) {
		t.Fatalf("the watch reports %v, want %v", got, want)
	}
	if r := testenv.HostLinkReport(got); !strings.Contains(r, "fkabcdef-1a") || !strings.Contains(r, "abcdef") || !strings.Contains(r, "nettest.Namespace") {
		t.Errorf("the report does not name the links, their tag and the fix:\n%s", r)
	}
}
