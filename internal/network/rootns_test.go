package network_test

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/network/nettest"
)

// testConfig is a test pool's config with a fresh tag.
func testConfig(t *testing.T) network.Config {
	t.Helper()
	var b [3]byte
	rand.Read(b[:])
	cfg, err := network.ParseConfig(nettest.Pool, network.DefaultGuestCIDR, network.DefaultGuestMAC, false, hex.EncodeToString(b[:]))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestNewRefusesTheHostsNamespace: a Host whose namespace is the host's
// initial one is refused unless the config says this daemon is the host's
// (network_root_namespace). The namespace here is the test's own, taken
// for the host's: nothing touches the real host network.
func TestNewRefusesTheHostsNamespace(t *testing.T) {
	ns := nettest.Namespace(t)
	cfg := testConfig(t)
	var h *network.Host
	err := network.Do(ns, func() (err error) { h, err = network.NewAsIfInitial(cfg); return err })
	if !errors.Is(err, network.ErrRootNamespace) {
		if h != nil {
			h.Close()
		}
		t.Fatalf("New in the host's namespace without network_root_namespace: %v, want ErrRootNamespace", err)
	}
	for _, want := range []string{"network_root_namespace", "--network-root-namespace"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the refusal does not say what to set (%q): %v", want, err)
		}
	}

	// The twin: the same namespace with the setting on networks VMs.
	cfg.RootNamespace = true
	if err := network.Do(ns, func() (err error) { h, err = network.NewAsIfInitial(cfg); return err }); err != nil {
		t.Fatalf("New with network_root_namespace: %v", err)
	}
	defer h.Close()
	if err := h.Ensure(0); err != nil {
		t.Fatalf("Ensure with network_root_namespace: %v", err)
	}
	if err := h.Remove(0); err != nil {
		t.Fatal(err)
	}
}

// TestNamespaceOfItsOwnIsNotTheHosts: a daemon inside a namespace a test
// made needs no setting, and that namespace is not taken for the host's;
// where this process sees kthreadd (always in the initial namespace), the
// namespace it started in is recognised as the host's when it is.
func TestNamespaceOfItsOwnIsNotTheHosts(t *testing.T) {
	ns := nettest.Namespace(t)
	var initial bool
	if err := network.Do(ns, func() (err error) { initial, err = network.InInitialNamespace(); return err }); err != nil {
		t.Fatal(err)
	}
	if initial {
		t.Fatal("a namespace the test made is taken for the host's initial one")
	}
	cfg := testConfig(t)
	var h *network.Host
	if err := network.Do(ns, func() (err error) { h, err = network.New(cfg); return err }); err != nil {
		t.Fatalf("New in a namespace of its own, without network_root_namespace: %v", err)
	}
	h.Close()

	comm, _ := os.ReadFile("/proc/2/comm")
	kthreadd, err1 := os.Readlink("/proc/2/ns/net")
	self, err2 := os.Readlink("/proc/self/ns/net")
	if string(comm) != "kthreadd\n" || err1 != nil || err2 != nil {
		t.Logf("kthreadd not visible here (%q, %v, %v): only the negative case is checked", comm, err1, err2)
		return
	}
	got, err := network.InInitialNamespace()
	if err != nil {
		t.Fatal(err)
	}
	if want := kthreadd == self; got != want {
		t.Errorf("InInitialNamespace() = %v in %s; kthreadd is in %s", got, self, kthreadd)
	}
}
