package reliability

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/network/nettest"
	"github.com/forkd/forkd/internal/testenv"
)

// netArgs are the flags of a networked daemon (flags, not environment: a
// restart keeps them): every VM networked, its pool from RFC 2544's range,
// warm networks kept ahead.
func netArgs(warm int) []string {
	return []string{"--network-cidr", nettest.Pool, "--network-default=true", "--network-warm=" + strconv.Itoa(warm)}
}

// newNetDaemon starts a daemon inside a network namespace of the test's
// own, networking every VM it makes, with no warm pool (so every network
// on the host belongs to an instance).
func newNetDaemon(t *testing.T) *Daemon { return newNetDaemonWarm(t, 0) }

// newNetDaemonWarm is newNetDaemon with a warm pool of warm networks.
func newNetDaemonWarm(t *testing.T, warm int) *Daemon {
	t.Helper()
	ns := nettest.Namespace(t)
	return newDaemonSpec(t, "", func(o *DaemonOptions) {
		o.NetNS = ns
		o.Args = append(o.Args, netArgs(warm)...)
	})
}

// warmOf is the --network-warm a daemon was started with.
func warmOf(d *Daemon) int {
	for _, a := range d.Spec.Args {
		if v, ok := strings.CutPrefix(a, "--network-warm="); ok {
			n, _ := strconv.Atoi(v)
			return n
		}
	}
	return 0
}

// checkNetworks fails t for every problem networkProblems still finds
// after a generous deadline. The daemon refills its warm pool in the
// background after an operation ends, so a look can meet a warm network
// half made (not yet whole, held by no instance): that passes once the
// refill finishes, while an orphan or a missing network stays and fails.
func checkNetworks(t *testing.T, d *Daemon) {
	t.Helper()
	problems := networkProblems(t, d)
	for deadline := time.Now().Add(30 * time.Second); len(problems) != 0 && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond) // a poll interval, not a synchronisation
		problems = networkProblems(t, d)
	}
	for _, p := range problems {
		t.Error(p)
	}
}

// networkProblems compares a networked daemon's kernel objects with its
// records: every networked instance's namespace and host link must be
// whole, and no namespace or link of the daemon's tag may be left that no
// instance holds.
func networkProblems(t *testing.T, d *Daemon) []string {
	t.Helper()
	if d.Spec.NetNS == "" {
		return nil
	}
	h, cfg := daemonNetwork(t, d)
	defer h.Close()
	list, err := d.Client.ListInstances(ctxT(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	held := map[int]string{}
	for _, in := range list {
		if !in.Network.Enabled {
			out = append(out, in.Name+": not networked under network_default=true")
			continue
		}
		a, err := netip.ParseAddr(in.Network.Address)
		slot, ok := cfg.SlotOf(a)
		if err != nil || !ok {
			out = append(out, in.Name+": address "+in.Network.Address+" is not in the pool")
			continue
		}
		if other, dup := held[slot]; dup {
			out = append(out, in.Name+" and "+other+" share address "+a.String())
		}
		held[slot] = in.Name
		if !h.Complete(slot) {
			out = append(out, in.Name+": its network "+in.Network.Namespace+" is missing or incomplete")
		}
	}
	present, err := h.Present()
	if err != nil {
		t.Fatal(err)
	}
	// With a warm pool, up to that many whole networks no instance holds
	// are the pool's (the API does not list them); beyond that, orphans.
	extra := 0
	for s := range present {
		if _, ok := held[s]; ok {
			continue
		}
		extra++
		if extra > warmOf(d) || !h.Complete(s) {
			out = append(out, "orphan network "+cfg.Namespace(s)+": no instance holds it")
		}
	}
	return out
}

// daemonNetwork opens a network.Host on a networked daemon's objects (its
// namespace, its data dir's tag), for checks and for planting faults.
func daemonNetwork(t *testing.T, d *Daemon) (*network.Host, network.Config) {
	t.Helper()
	cfg, err := network.ParseConfig(nettest.Pool, network.DefaultGuestCIDR, network.DefaultGuestMAC, false, network.Tag(d.Spec.DataDir))
	if err != nil {
		t.Fatal(err)
	}
	var h *network.Host
	if err := network.Do(d.Spec.NetNS, func() (err error) { h, err = network.New(cfg); return err }); err != nil {
		t.Fatal(err)
	}
	return h, cfg
}

// TestNetworkCheckCatchesOrphansAndMissing is the twin of checkNetworks:
// a planted orphan namespace and a removed recorded one are both reported.
func TestNetworkCheckCatchesOrphansAndMissing(t *testing.T) {
	d := newNetDaemon(t)
	createStandby(t, d.Client, "a")
	if p := networkProblems(t, d); len(p) != 0 {
		t.Fatalf("a healthy daemon: %v", p)
	}
	h, cfg := daemonNetwork(t, d)
	defer h.Close()
	if err := h.Ensure(100); err != nil {
		t.Fatal(err)
	}
	in, err := d.Client.GetInstance(ctxT(t, 10*time.Second), "a")
	if err != nil {
		t.Fatal(err)
	}
	a, _ := netip.ParseAddr(in.Network.Address)
	slot, _ := cfg.SlotOf(a)
	if err := h.Remove(slot); err != nil {
		t.Fatal(err)
	}
	p := networkProblems(t, d)
	if len(p) != 2 {
		t.Fatalf("with an orphan and a missing network the check reports %v, want both", p)
	}
	h.Remove(100)
	// Put a's network back, so the cleanup's delete finds what it expects.
	if err := h.Ensure(slot); err != nil {
		t.Fatal(err)
	}
}

// networkCrashCases are the crash points only a networked VM passes (the
// "network" steps of create and fork); crashCases includes them.
func networkCrashCases() []crashCase {
	create := func(ctx context.Context, c *api.Client) error {
		_, err := c.CreateInstance(ctx, api.CreateInstanceRequest{Name: "new", MemoryMiB: testMemMiB, BootArgs: testBootArgs})
		return err
	}
	fork := func(live bool) func(ctx context.Context, c *api.Client) error {
		return func(ctx context.Context, c *api.Client) error {
			_, err := c.ForkInstance(ctx, "src", api.ForkRequest{Name: "kid", FromRunning: live})
			return err
		}
	}
	return []crashCase{
		{at: "create:network", net: true, op: create},
		{at: "warm:reserving", net: true, warm: 2, op: create},
		{at: "warm:reserved", net: true, warm: 2, op: create},
		{at: "warm:readying", net: true, warm: 2, op: create},
		{at: "warm:ready", net: true, warm: 2, op: create},
		{at: "fork:network", net: true, setup: func(t *testing.T, c *api.Client) { createStandby(t, c, "src") }, op: fork(false)},
		{at: "fork:network", variant: "live", net: true, setup: func(t *testing.T, c *api.Client) { createRunning(t, c, "src") }, op: fork(true)},
	}
}

// networkedCrashCases runs, on a networked daemon, the other crash points
// of every operation that makes, keeps or removes a VM's network.
func networkedCrashCases() []crashCase {
	var out []crashCase
	for _, tc := range crashCases() {
		if tc.net {
			continue // already networked
		}
		switch tc.at {
		case "create:begun", "create:files", "fork:begun", "fork:files", "fork:committed", "delete:begun",
			"fork:batch-renaming", "fork:batch-files", "fork:batch-committed", // a batch's slots: every one freed, or every one kept
			"start:booted", "restore:launched", "restore:resumed", "standby:created", "stop:begun":
			tc.net = true
			if tc.variant == "" {
				tc.variant = "networked"
			} else {
				tc.variant += "/networked"
			}
			out = append(out, tc)
		}
	}
	return out
}

// TestCrashAtEveryNetworkStepLeavesNoOrphan: the crash suite on a networked
// daemon. After each crash and restart, every networked instance's network
// is whole and no namespace or link of the daemon's is left that no
// instance holds (checkAll runs checkNetworks).
func TestCrashAtEveryNetworkStepLeavesNoOrphan(t *testing.T) {
	for _, tc := range networkedCrashCases() {
		name := tc.at
		if tc.variant != "" {
			name += "/" + tc.variant
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			runCrashCase(t, tc)
		})
	}
}

// TestRestartRemakesNetworksAHostRebootRemoved removes every namespace and
// host link of a stopped daemon, as a host reboot does, and checks the
// next start makes each recorded one again, and removes a namespace of its
// tag that no record holds.
func TestRestartRemakesNetworksAHostRebootRemoved(t *testing.T) {
	d := newNetDaemon(t)
	createStandby(t, d.Client, "a")
	createRunning(t, d.Client, "b")
	action(t, d.Client, "b", "stop")
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	h, cfg := daemonNetwork(t, d)
	defer h.Close()
	present, _ := h.Present()
	if len(present) != 2 {
		t.Fatalf("%d networks before the 'reboot', want 2", len(present))
	}
	for s := range present {
		if err := h.Remove(s); err != nil {
			t.Fatal(err)
		}
	}
	// And one no record holds, as a crash before the record could leave.
	const stray = 200
	if err := h.Ensure(stray); err != nil {
		t.Fatal(err)
	}
	d = restart(t, d, nil)
	checkAll(t, d)
	if _, err := os.Stat(filepath.Join("/var/run/netns", cfg.Namespace(stray))); err == nil {
		t.Errorf("the stray namespace %s survived the restart", cfg.Namespace(stray))
	}
	action(t, d.Client, "a", "restore")
	if in, err := d.Client.GetInstance(ctxT(t, 10*time.Second), "a"); err != nil || in.State != api.StateRunning {
		t.Fatalf("restore after the rebuild: %v (%+v)", err, in)
	}
	checkAll(t, d)
}

// TestDaemonInTheHostsNamespaceNetworksNothing: a daemon started in the
// host's own network namespace with the default settings (what every test
// daemon that is not a networking one is) has networking off: a networked
// create is refused with the setting that would allow it, and creates,
// starts, forks and a restart of VMs without a network make no VM link of
// its tag there (the daemons that once did filled the host with them).
func TestDaemonInTheHostsNamespaceNetworksNothing(t *testing.T) {
	if initial, err := network.InInitialNamespace(); err != nil || !initial {
		testenv.Need(t, testenv.Netns, fmt.Sprintf("this test binary does not run in the host's initial network namespace (%v)", err))
	}
	d := newDaemon(t, nil)
	ctx := ctxT(t, 60*time.Second)
	on := true
	_, err := d.Client.CreateInstance(ctx, api.CreateInstanceRequest{Name: "net", MemoryMiB: testMemMiB, BootArgs: testBootArgs,
		Network: &api.NetworkRequest{Enabled: &on}})
	if err == nil || !strings.Contains(err.Error(), "network_root_namespace") {
		t.Fatalf("a networked create on a daemon in the host's namespace: %v; want a refusal naming network_root_namespace", err)
	}
	createRunning(t, d.Client, "a")
	if _, err := d.Client.ForkInstance(ctx, "a", api.ForkRequest{Name: "b", FromRunning: true, TargetState: api.StateRunning}); err != nil {
		t.Fatal(err)
	}
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	d = restart(t, d, nil)
	createStandby(t, d.Client, "c")
	tag := network.Tag(d.Spec.DataDir)
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, "fk"+tag+"-") {
			t.Errorf("the daemon made VM link %s in the host's namespace", l.Attrs().Name)
		}
	}
	if ns, _ := filepath.Glob("/var/run/netns/forkd-" + tag + "-*"); len(ns) != 0 {
		t.Errorf("the daemon made VM namespaces %v", ns)
	}
}
