package instance

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/testnet"
)

// guestAnswer is the part of the emulated guest's GET / the tests read.
type guestAnswer struct {
	BootID          string `json:"boot_id"`
	Ticks           uint64 `json:"ticks"`
	IntegrityErrors uint64 `json:"integrity_errors"`
}

// netManager is a manager whose daemon namespace is tn's (the test's own:
// every packet below is sent from a socket in it, to addresses routed only
// inside it).
func netManager(t *testing.T, tn *testnet.NS, env *netEnv, opts ...testOpt) *Manager {
	t.Helper()
	env.ns = tn.Path
	return newTestManager(t, append([]testOpt{func(c *Config) {
		nc, err := network.ParseConfig("198.18.0.0/24", network.DefaultGuestCIDR, network.DefaultGuestMAC, false, network.Tag(c.DataDir))
		if err != nil {
			t.Fatal(err)
		}
		if err := network.Do(env.ns, func() (err error) { env.host, err = network.New(nc); return err }); err != nil {
			t.Fatal(err)
		}
		// A small warm pool: some forks take a network made ahead, the rest
		// make their own while the pool refills.
		c.Network, c.NetworkDefault, c.NetworkWarm = env.host, true, 4
	}}, opts...)...)
}

// firstContact pings a VM's address once and GETs / once, as a client
// would the moment the call that started the VM returned: no retry of
// either. It returns the guest's answer.
func firstContact(t *testing.T, tn *testnet.NS, p *testnet.Pinger, in api.Instance, seq int) guestAnswer {
	t.Helper()
	g, err := contact(tn, p, in, seq)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// contact is firstContact's ping and GET /, returning what failed.
func contact(tn *testnet.NS, p *testnet.Pinger, in api.Instance, seq int) (guestAnswer, error) {
	addr, err := netip.ParseAddr(in.Network.Address)
	if err != nil {
		return guestAnswer{}, fmt.Errorf("%s: address %q: %w", in.Name, in.Network.Address, err)
	}
	if err := p.Ping(addr, seq, 10*time.Second); err != nil {
		return guestAnswer{}, fmt.Errorf("%s: the first ping to %s after its restore returned failed: %w", in.Name, addr, err)
	}
	resp, err := tn.HTTPClient(10 * time.Second).Get("http://" + net.JoinHostPort(addr.String(), "80") + "/")
	if err != nil {
		return guestAnswer{}, fmt.Errorf("%s: the first GET / to %s after its restore returned failed: %w", in.Name, addr, err)
	}
	defer resp.Body.Close()
	var g guestAnswer
	if err := json.NewDecoder(resp.Body).Decode(&g); err != nil || resp.StatusCode != 200 || g.BootID == "" {
		return g, fmt.Errorf("%s: GET / = %d, %+v, %v; want 200 with a boot_id", in.Name, resp.StatusCode, g, err)
	}
	return g, nil
}

// TestForksAnswerTheMomentTheirRestoreReturns makes 25 live forks of a
// networked Running VM and 25 forks of a snapshot of it (alternately File
// and Uffd restores). Each one's first ping and first GET /, sent after
// its fork call returns, succeed with no retry, and report its source's
// boot_id: the guest in the fork is the source's, unchanged, at an address
// of its own.
func TestForksAnswerTheMomentTheirRestoreReturns(t *testing.T) {
	tn := testnet.New(t)
	var env netEnv
	m := netManager(t, tn, &env)
	ctx := context.Background()
	src, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "src", MemoryMiB: testMemMiB, BootArgs: testBootArgs})
	if err != nil {
		t.Fatal(err)
	}
	p := tn.NewPinger()
	seq := 0
	next := func() int { seq++; return seq }
	source := firstContact(t, tn, p, src, next())
	const n = 25
	seen := map[string]bool{src.Network.Address: true}
	check := func(f api.Instance) {
		t.Helper()
		if f.State != api.StateRunning || !f.Network.Enabled || seen[f.Network.Address] {
			t.Fatalf("%s: state %s, network %+v (address taken before: %v)", f.Name, f.State, f.Network, seen[f.Network.Address])
		}
		seen[f.Network.Address] = true
		g := firstContact(t, tn, p, f, next())
		if g.BootID != source.BootID {
			t.Fatalf("%s reports boot_id %s, want its source's %s", f.Name, g.BootID, source.BootID)
		}
	}
	for i := range n {
		f, err := m.ForkInstance(ctx, "src", api.ForkRequest{Name: fmt.Sprintf("live-%d", i), FromRunning: true})
		if err != nil {
			t.Fatal(err)
		}
		check(f)
	}
	// The source still answers, at its own address, after 25 live forks.
	if g := firstContact(t, tn, p, src, next()); g.BootID != source.BootID {
		t.Fatalf("the source's boot_id changed: %s, was %s", g.BootID, source.BootID)
	}
	if _, err := m.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "snap"}); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		backend := api.BackendFile
		if i%2 == 1 {
			backend = api.BackendUffd
		}
		f, err := m.ForkSnapshot(ctx, "snap", api.ForkRequest{Name: fmt.Sprintf("snap-%d", i), TargetState: api.StateRunning, RestoreBackend: backend})
		if err != nil {
			t.Fatal(err)
		}
		check(f)
	}
	if len(seen) != 2*n+1 {
		t.Fatalf("%d distinct addresses for %d VMs", len(seen), 2*n+1)
	}
}

// TestVMsCannotReachSiblingsOrTheDaemon: from inside one VM's namespace, a
// sibling's address and a listener in the daemon's namespace are both
// unreachable, while the daemon's namespace reaches both VMs.
func TestVMsCannotReachSiblingsOrTheDaemon(t *testing.T) {
	tn := testnet.New(t)
	var env netEnv
	m := netManager(t, tn, &env)
	ctx := context.Background()
	a, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "a", MemoryMiB: testMemMiB, BootArgs: testBootArgs})
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "b", MemoryMiB: testMemMiB, BootArgs: testBootArgs})
	if err != nil {
		t.Fatal(err)
	}
	// A listener in the daemon's namespace, on every address (as a daemon's
	// TCP API might be).
	var l net.Listener
	tn.Do(func() (err error) { l, err = net.Listen("tcp4", "0.0.0.0:0"); return err })
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	port := l.Addr().(*net.TCPAddr).Port
	hostAddr := env.host.Config().HostAddr().String()
	vmNS := "/var/run/netns/" + a.Network.Namespace
	dial := func(addr string) error {
		return network.Do(vmNS, func() error {
			c, err := net.DialTimeout("tcp4", addr, absentWait)
			if err == nil {
				c.Close()
			}
			return err
		})
	}
	if err := dial(net.JoinHostPort(b.Network.Address, "80")); err == nil {
		t.Error("from a's namespace, b's guest answered on port 80")
	}
	if err := dial(net.JoinHostPort(hostAddr, fmt.Sprint(port))); err == nil {
		t.Error("from a's namespace, the daemon's listener answered")
	}
	// Twin: from the daemon's namespace both answer, so the refusals above
	// are the rules', not a dead guest or listener.
	for _, addr := range []string{net.JoinHostPort(b.Network.Address, "80"), net.JoinHostPort(hostAddr, fmt.Sprint(port))} {
		c, err := tn.Dial(ctx, addr)
		if err != nil {
			t.Fatalf("from the daemon's namespace %s does not answer: %v", addr, err)
		}
		c.Close()
	}
}

// absentWait bounds a connection attempt that must fail (a drop is only
// seen as silence); each such check has a twin that succeeds.
const absentWait = 2 * time.Second

// TestPublishedPortsReachTheGuest publishes port 8080 (every address of the
// daemon's namespace) to a VM's port 80 and 8081 to its fork's: GET / on
// each reaches the right guest, and the fork did not inherit its source's.
func TestPublishedPortsReachTheGuest(t *testing.T) {
	tn := testnet.New(t)
	var env netEnv
	m := netManager(t, tn, &env)
	ctx := context.Background()
	src, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "src", MemoryMiB: testMemMiB, BootArgs: testBootArgs,
		Publish: []api.PortPublish{{HostPort: 8080, GuestPort: 80}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(src.Publish) != 1 || src.Publish[0].HostPort != 8080 || src.Publish[0].Protocol != "tcp" {
		t.Fatalf("src publish = %+v, want 8080->80/tcp", src.Publish)
	}
	f, err := m.ForkInstance(ctx, "src", api.ForkRequest{Name: "f", FromRunning: true, Publish: []api.PortPublish{{HostIP: "127.0.0.1", HostPort: 8081, GuestPort: 80}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Publish) != 1 || f.Publish[0].HostPort != 8081 {
		t.Fatalf("fork publish = %+v, want only its own 8081", f.Publish)
	}
	get := func(url string) (guestAnswer, error) {
		resp, err := tn.HTTPClient(10 * time.Second).Get(url)
		if err != nil {
			return guestAnswer{}, err
		}
		defer resp.Body.Close()
		var g guestAnswer
		return g, json.NewDecoder(resp.Body).Decode(&g)
	}
	a, err := get("http://127.0.0.1:8080/")
	if err != nil || a.BootID == "" {
		t.Fatalf("GET 127.0.0.1:8080 (published to src): %+v, %v", a, err)
	}
	b, err := get("http://127.0.0.1:8081/")
	if err != nil || b.BootID != a.BootID {
		t.Fatalf("GET 127.0.0.1:8081 (published to the fork): %+v, %v; want the source's boot_id %s", b, err, a.BootID)
	}
	// The fork's address answers too, and the two publishes are distinct
	// DNATs: deleting the source leaves the fork's port working.
	if err := m.DeleteInstance(ctx, "src"); err != nil {
		t.Fatal(err)
	}
	if _, err := get("http://127.0.0.1:8081/"); err != nil {
		t.Fatalf("the fork's published port after deleting the source: %v", err)
	}
	if _, err := get("http://127.0.0.1:8080/"); err == nil {
		t.Fatal("the deleted source's published port still answers")
	}
}
