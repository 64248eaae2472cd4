package instance

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/network/nettest"
	"github.com/forkd/forkd/internal/store"
)

// netEnv is a manager's networking in a test: its daemon namespace (made by
// the test: nothing reaches the host's network) and its Host.
type netEnv struct {
	ns   string
	host *network.Host
}

// withNetwork gives the manager a network Host whose daemon namespace is a
// fresh test namespace, with pool (default nettest.Pool).
func withNetwork(t *testing.T, env *netEnv, pool string) testOpt {
	t.Helper()
	if pool == "" {
		pool = nettest.Pool
	}
	env.ns = nettest.Namespace(t)
	return func(c *Config) {
		nc, err := network.ParseConfig(pool, network.DefaultGuestCIDR, network.DefaultGuestMAC, false, network.Tag(c.DataDir))
		if err != nil {
			t.Fatal(err)
		}
		if err := network.Do(env.ns, func() (err error) { env.host, err = network.New(nc); return err }); err != nil {
			t.Fatal(err)
		}
		c.Network = env.host
	}
}

func netOn() *api.NetworkRequest { on := true; return &api.NetworkRequest{Enabled: &on} }

// nsInode is the inode of a network namespace file (/proc/PID/ns/net or a
// named one): equal inodes are the same namespace.
func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return st.Ino
}

func checkNetworked(t *testing.T, m *Manager, env *netEnv, in api.Instance) {
	t.Helper()
	n := in.Network
	if !n.Enabled || n.Address == "" || n.GuestAddress != "169.254.0.21" || n.GuestMAC != network.DefaultGuestMAC || n.Namespace == "" {
		t.Fatalf("%s: network = %+v; want enabled, an address, guest 169.254.0.21 and %s, a namespace", in.Name, n, network.DefaultGuestMAC)
	}
	if !env.host.Complete(slotOf(t, env, n.Address)) {
		t.Fatalf("%s: its network %s is not complete", in.Name, n.Namespace)
	}
	if in.State == api.StateRunning {
		if got, want := nsInode(t, "/proc/"+itoa(in.Pid)+"/ns/net"), nsInode(t, "/var/run/netns/"+n.Namespace); got != want {
			t.Fatalf("%s: its VMM (pid %d) runs in namespace inode %d, want its own %s (%d)", in.Name, in.Pid, got, n.Namespace, want)
		}
	}
}

func slotOf(t *testing.T, env *netEnv, addr string) int {
	t.Helper()
	ip, err := netipParse(addr)
	if err != nil {
		t.Fatal(err)
	}
	s, ok := env.host.Config().SlotOf(ip)
	if !ok {
		t.Fatalf("address %s is not in the pool %s", addr, env.host.Config().Pool)
	}
	return s
}

// TestNetworkFollowsTheInstance: a networked VM's VMM runs in its own
// namespace; standby and restore keep its address; every kind of fork
// gets its own address and namespace and the source's guest identity;
// delete removes everything and frees the address.
func TestNetworkFollowsTheInstance(t *testing.T) {
	var env netEnv
	m := newTestManager(t, withNetwork(t, &env, ""))
	ctx := context.Background()
	src, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "src", MemoryMiB: testMemMiB, BootArgs: testBootArgs, Network: netOn()})
	if err != nil {
		t.Fatal(err)
	}
	checkNetworked(t, m, &env, src)
	if !strings.Contains(src.BootArgs, "ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off") {
		t.Errorf("boot args %q: want the guest's ip=", src.BootArgs)
	}
	live, err := m.ForkInstance(ctx, "src", api.ForkRequest{Name: "live", FromRunning: true})
	if err != nil {
		t.Fatal(err)
	}
	checkNetworked(t, m, &env, live)
	sb, err := m.Action(ctx, "src", "standby", api.ActionRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if sb.Network != src.Network {
		t.Fatalf("standby changed the network: %+v, was %+v", sb.Network, src.Network)
	}
	f1, err := m.ForkInstance(ctx, "src", api.ForkRequest{Name: "f1", TargetState: api.StateRunning})
	if err != nil {
		t.Fatal(err)
	}
	checkNetworked(t, m, &env, f1)
	if _, err := m.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "snap"}); err != nil {
		t.Fatal(err)
	}
	f2, err := m.ForkSnapshot(ctx, "snap", api.ForkRequest{Name: "f2", TargetState: api.StateRunning})
	if err != nil {
		t.Fatal(err)
	}
	checkNetworked(t, m, &env, f2)
	back, err := m.Action(ctx, "src", "restore", api.ActionRequest{})
	if err != nil {
		t.Fatal(err)
	}
	checkNetworked(t, m, &env, back)
	if back.Network != src.Network {
		t.Fatalf("restore changed the network: %+v, was %+v", back.Network, src.Network)
	}
	seen := map[string]string{}
	for _, in := range []api.Instance{back, live, f1, f2} {
		if other, dup := seen[in.Network.Address]; dup {
			t.Fatalf("%s and %s share address %s", in.Name, other, in.Network.Address)
		}
		seen[in.Network.Address] = in.Name
	}
	for _, name := range []string{"src", "live", "f1", "f2"} {
		if err := m.DeleteInstance(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	if p, err := env.host.Present(); err != nil || len(p) != 0 {
		t.Fatalf("after deleting every VM, networks still present: %v (%v)", p, err)
	}
	again, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "again", MemoryMiB: testMemMiB, BootArgs: testBootArgs, Network: netOn(), Start: new(bool)})
	if err != nil {
		t.Fatal(err)
	}
	if again.Network.Address != src.Network.Address {
		t.Errorf("after every delete, the next VM got %s, want the freed lowest address %s", again.Network.Address, src.Network.Address)
	}
}

// TestNetworkBadInputLeaksNothing: an exhausted pool is ErrPoolExhausted, a
// publish of a port a host process holds is ErrPortInUse, a publish without
// a network is invalid; none leaves a record or a network behind.
func TestNetworkBadInputLeaksNothing(t *testing.T) {
	var env netEnv
	m := newTestManager(t, withNetwork(t, &env, "198.18.0.0/30")) // one address
	ctx := context.Background()
	off := false
	if _, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "one", MemoryMiB: testMemMiB, Network: netOn(), Start: &off}); err != nil {
		t.Fatal(err)
	}
	count := func() (int, int) {
		l, _ := m.ListInstances(ctx)
		p, _ := env.host.Present()
		return len(l), len(p)
	}
	n0, p0 := count()
	_, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "two", MemoryMiB: testMemMiB, Network: netOn(), Start: &off})
	if !errors.Is(err, api.ErrPoolExhausted) {
		t.Fatalf("second VM in a one-address pool: %v, want ErrPoolExhausted", err)
	}
	if _, err := m.ForkInstance(ctx, "one", api.ForkRequest{Name: "f"}); !errors.Is(err, api.ErrPoolExhausted) {
		t.Fatalf("fork in a full pool: %v, want ErrPoolExhausted", err)
	}
	var l net.Listener
	if err := network.Do(env.ns, func() (err error) { l, err = net.Listen("tcp4", "127.0.0.1:0"); return err }); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port
	_, err = m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "pub", MemoryMiB: testMemMiB, Network: netOn(), Start: &off,
		Publish: []api.PortPublish{{HostIP: "127.0.0.1", HostPort: port, GuestPort: 80}}})
	if !errors.Is(err, api.ErrPortInUse) {
		t.Fatalf("publish of a port a host process holds: %v, want ErrPortInUse", err)
	}
	_, err = m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "nonet", MemoryMiB: testMemMiB, Start: &off,
		Publish: []api.PortPublish{{HostPort: 8080, GuestPort: 80}}})
	if !errors.Is(err, api.ErrInvalid) {
		t.Fatalf("publish without a network: %v, want ErrInvalid", err)
	}
	if n, p := count(); n != n0 || p != p0 {
		t.Fatalf("after refused requests: %d instances and %d networks, want %d and %d (nothing leaked)", n, p, n0, p0)
	}
	if ents, _ := os.ReadDir(m.layout.JailsDir()); len(ents) != n0 {
		t.Fatalf("after refused requests: %d guest dirs, want %d", len(ents), n0)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func netipParse(s string) (netip.Addr, error) { return netip.ParseAddr(s) }

// TestWarmPoolGivesForksAReadyNetwork: nothing is made before a VM is
// networked; then the pool keeps NetworkWarm networks ready, a fork takes
// one of them, and a restart with no networked VM left removes them all.
func TestWarmPoolGivesForksAReadyNetwork(t *testing.T) {
	var env netEnv
	dir, err := os.MkdirTemp("", "fk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	warm := func(c *Config) { c.NetworkWarm = 2 }
	m := newManagerAt(t, dir, withNetwork(t, &env, ""), warm)
	ctx := context.Background()
	if p, _ := env.host.Present(); len(p) != 0 {
		t.Fatalf("before any networked VM, %d networks exist; want none", len(p))
	}
	off := false
	src, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "src", MemoryMiB: testMemMiB, BootArgs: testBootArgs, Network: netOn(), Start: &off})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.waitWarm(ctxT(t), 2); err != nil {
		t.Fatal(err)
	}
	ws, _ := m.db.WarmSlots(ctx)
	warmAddr := map[string]bool{}
	for _, w := range ws {
		if !env.host.Complete(w.Slot) {
			t.Fatalf("warm slot %d is marked ready but its network is not whole", w.Slot)
		}
		warmAddr[env.host.Config().Address(w.Slot).String()] = true
	}
	f, err := m.ForkInstance(ctx, src.ID, api.ForkRequest{Name: "f"})
	if err != nil {
		t.Fatal(err)
	}
	if !warmAddr[f.Network.Address] {
		t.Fatalf("the fork got %s, not one of the warm networks %v", f.Network.Address, warmAddr)
	}
	if err := m.waitWarm(ctxT(t), 2); err != nil {
		t.Fatal(err)
	}
	if p, _ := env.host.Present(); len(p) != 4 {
		t.Fatalf("%d networks for 2 VMs and a pool of 2, want 4", len(p))
	}
	for _, id := range []string{src.ID, f.ID} {
		if err := m.DeleteInstance(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	// The last networked VM gone, the pool goes with it: nothing is left.
	if p, _ := env.host.Present(); len(p) != 0 {
		t.Fatalf("after deleting the last networked VM, %d networks remain; want none", len(p))
	}
	// A pool left by a daemon that stopped with warm networks and no VM is
	// dropped at the next start.
	if err := m.db.GroupUnsynced(ctx, "warm:reserving", func(tx *store.Tx) error {
		_, err := tx.ReserveWarmSlot(env.host.Config().Slots())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := env.host.Ensure(0); err != nil {
		t.Fatal(err)
	}
	m.Close()
	// A restart with no networked VM left drops the pool and the host table.
	m2, err := New(ctx, Config{DataDir: dir, VMM: m.cfg.VMM, PagerBinary: m.cfg.PagerBinary, Logger: m.log, Network: reopen(t, &env), NetworkWarm: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if p, _ := env.host.Present(); len(p) != 0 {
		t.Fatalf("after a restart with no networked VM, %d networks remain; want none", len(p))
	}
	if ws, _ := m2.db.WarmSlots(ctx); len(ws) != 0 {
		t.Fatalf("warm rows after the restart: %v, want none", ws)
	}
}

// reopen gives env a new Host on the same namespace and configuration (the
// old one was closed with its manager).
func reopen(t *testing.T, env *netEnv) *network.Host {
	t.Helper()
	cfg := env.host.Config()
	if err := network.Do(env.ns, func() (err error) { env.host, err = network.New(cfg); return err }); err != nil {
		t.Fatal(err)
	}
	return env.host
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// nsCounts counts a namespace's links, IPv4 routes and nftables tables.
func nsCounts(t *testing.T, ns string) (links, routes, tables int) {
	t.Helper()
	err := network.Do(ns, func() error {
		l, err := netlink.LinkList()
		if err != nil {
			return err
		}
		r, err := netlink.RouteList(nil, unix.AF_INET)
		if err != nil {
			return err
		}
		h, err := vnetns.Get()
		if err != nil {
			return err
		}
		defer h.Close()
		nc, err := nftables.New(nftables.WithNetNSFd(int(h)))
		if err != nil {
			return err
		}
		tb, err := nc.ListTables()
		links, routes, tables = len(l), len(r), len(tb)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return links, routes, tables
}

// TestDeleteLeavesNothing counts namespaces, links, routes and nftables
// tables in the daemon's namespace with one networked VM, then creates,
// forks (with a publish) and deletes two more: every count is back.
func TestDeleteLeavesNothing(t *testing.T) {
	var env netEnv
	m := newTestManager(t, withNetwork(t, &env, ""))
	ctx := context.Background()
	off := false
	if _, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "keep", MemoryMiB: testMemMiB, Network: netOn(), Start: &off}); err != nil {
		t.Fatal(err)
	}
	// This daemon's namespaces (by its tag: other tests make theirs at the same time).
	namespaces := func() int { p, _ := env.host.Present(); return len(p) }
	n0 := namespaces()
	l0, r0, t0 := nsCounts(t, env.ns)
	a, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "a", MemoryMiB: testMemMiB, BootArgs: testBootArgs, Network: netOn()})
	if err != nil {
		t.Fatal(err)
	}
	f, err := m.ForkInstance(ctx, "a", api.ForkRequest{Name: "f", FromRunning: true, Publish: []api.PortPublish{{HostPort: 9090, GuestPort: 80}}})
	if err != nil {
		t.Fatal(err)
	}
	if l, r, _ := nsCounts(t, env.ns); l != l0+2 || r != r0+2 {
		t.Fatalf("with two more VMs: %d links, %d routes; want %d and %d", l, r, l0+2, r0+2)
	}
	for _, id := range []string{f.ID, a.ID} {
		if err := m.DeleteInstance(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	l, r, tb := nsCounts(t, env.ns)
	if n := namespaces(); n != n0 || l != l0 || r != r0 || tb != t0 {
		t.Fatalf("after deleting them: %d namespaces, %d links, %d routes, %d tables; want %d, %d, %d, %d", n, l, r, tb, n0, l0, r0, t0)
	}
}
