package emulator

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/testnet"
)

// The guest identity of Firecracker's clone example (and forkd's
// defaults). Every address here exists only inside a namespace the test
// made.
const (
	netGuestMAC = "02:fc:00:00:00:05"
	netTapMAC   = "02:fc:00:00:00:06"
	netIPArg    = "ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off"
	netTap      = "tap0"
)

var (
	netGuest  = netip.MustParseAddr("169.254.0.21")
	netGWCIDR = netip.MustParsePrefix("169.254.0.22/30")
)

// netNS makes a namespace with the gateway TAP called tap in it.
func netNS(t *testing.T, tap string) *testnet.NS {
	t.Helper()
	ns := testnet.New(t)
	ns.AddTAP(testnet.TAP{Name: tap, MAC: testnet.ParseMAC(t, netTapMAC), Addr: netGWCIDR})
	return ns
}

// startVMMIn starts a VMM whose network namespace is ns.
func startVMMIn(t *testing.T, dir string, ns *testnet.NS) *vmmProc {
	t.Helper()
	return startVMMWith(t, dir, ns.Start)
}

// bootNet configures a VM with eth0 on tap0 and the guest address, and
// starts it.
func (p *vmmProc) bootNet(track bool) {
	p.t.Helper()
	p.must("PUT", "/network-interfaces/eth0", map[string]any{"iface_id": "eth0", "host_dev_name": netTap, "guest_mac": netGuestMAC}, 204)
	p.boot(bootSpec{vcpus: 2, memMib: 32, track: track, bootArgs: testBootArgs + " " + netIPArg})
}

// guestPage is GET / on the guest's port 80.
type guestPage struct {
	GuestStats
	retransmits uint32 // TCP segments the client had to retransmit
}

// getGuest sends one GET / to the guest from inside ns, on a fresh
// connection, and reports whether any TCP segment of it was retransmitted
// (the kernel's SYN retry would otherwise hide a first SYN the guest missed).
func getGuest(t *testing.T, ns *testnet.NS) (guestPage, error) {
	t.Helper()
	var conn net.Conn
	client := &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			c, err := ns.Dial(ctx, addr)
			conn = c
			return c, err
		},
	}}
	resp, err := client.Get("http://" + netGuest.String() + "/")
	if err != nil {
		return guestPage{}, err
	}
	defer resp.Body.Close()
	var page guestPage
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return page, fmt.Errorf("GET /: status %d: %s", resp.StatusCode, body)
	}
	if err := json.Unmarshal(body, &page.GuestStats); err != nil {
		return page, fmt.Errorf("GET /: %v: %s", err, body)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		if raw, err := tc.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) {
				if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
					page.retransmits = info.Total_retrans
				}
			})
		}
	}
	return page, nil
}

// answersAtOnce checks the first ping and the first GET / sent to a guest:
// each must succeed with no retry of any kind. It returns the guest's page.
func answersAtOnce(t *testing.T, ns *testnet.NS, what string) guestPage {
	t.Helper()
	if err := ns.NewPinger().Ping(netGuest, 1, 30*time.Second); err != nil {
		t.Fatalf("%s: first ping: %v", what, err)
	}
	page, err := getGuest(t, ns)
	if err != nil {
		t.Fatalf("%s: first GET /: %v", what, err)
	}
	if page.retransmits != 0 {
		t.Fatalf("%s: first GET / needed %d TCP retransmissions", what, page.retransmits)
	}
	if len(page.BootID) != 32 {
		t.Fatalf("%s: GET / boot_id %q, want 32 hex digits", what, page.BootID)
	}
	return page
}

func echoOnce(t *testing.T, ns *testnet.NS, msg string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := ns.Dial(ctx, netGuest.String()+":7")
	if err != nil {
		t.Fatalf("connect to the guest's echo port: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	go io.WriteString(c, msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
		t.Fatalf("TCP echo: got %q (err %v), want %q", got, err, msg)
	}
}

func TestGuestAnswersARPPingEchoAndHTTPOnItsTAP(t *testing.T) {
	ns := netNS(t, netTap)
	dir := t.TempDir()
	p := startVMMIn(t, dir, ns)
	p.bootNet(false)
	page := answersAtOnce(t, ns, "booted guest")
	echoOnce(t, ns, strings.Repeat("echo through netstack ", 500))
	st := p.guest()
	if st.BootID != page.BootID {
		t.Fatalf("GET /guest boot_id %q, the guest's GET / says %q", st.BootID, page.BootID)
	}
	requireClean(t, "booted guest", p.waitTicks(100))
	if later, err := getGuest(t, ns); err != nil || later.Ticks < 100 || later.PagesVerified == 0 || later.BootID != page.BootID {
		t.Fatalf("GET / after 100 steps: %+v (%v); want the workload's live facts and the same boot_id", later.GuestStats, err)
	}
	// The guest answered ARP with the MAC it was given.
	if mac := ns.NeighbourMAC(netTap, netGuest); mac != netGuestMAC {
		t.Fatalf("the namespace resolved %s to %q, want the guest_mac %s", netGuest, mac, netGuestMAC)
	}
	var cfg struct {
		Net []netIface `json:"network-interfaces"`
	}
	json.Unmarshal([]byte(p.must("GET", "/vm/config", nil, 200)), &cfg)
	if len(cfg.Net) != 1 || cfg.Net[0].HostDevName != netTap || cfg.Net[0].GuestMAC != netGuestMAC {
		t.Fatalf("GET /vm/config network-interfaces %+v", cfg.Net)
	}
}

// TestForksAnswerTheMomentTheirLoadReturns: Full and Diff snapshots of a
// networked VM, each loaded (File and Uffd) by a fresh VMM in a namespace
// of its own with a TAP of the same name: the first ping and the first GET
// sent after the load call returns succeed with no retry, and the fork
// reports its source's boot_id.
func TestForksAnswerTheMomentTheirLoadReturns(t *testing.T) {
	src := netNS(t, netTap)
	dir := t.TempDir()
	p := startVMMIn(t, dir, src)
	p.bootNet(true)
	boot := answersAtOnce(t, src, "source").BootID
	p.waitTicks(200)
	p.pause()
	full, fullMem := filepath.Join(dir, "full.vmstate"), filepath.Join(dir, "full.mem")
	p.snapshot("Full", full, fullMem)
	// A Diff on a copy of the Full image: the merged file is the VM now.
	p.resume()
	p.waitTicks(400)
	p.pause()
	diff, diffMem := filepath.Join(dir, "diff.vmstate"), filepath.Join(dir, "diff.mem")
	copyFile(t, fullMem, diffMem)
	p.snapshot("Diff", diff, diffMem)

	for _, tc := range []struct {
		name, vmstate, mem, backend string
	}{
		{"full-file", full, fullMem, "File"},
		{"diff-file", diff, diffMem, "File"},
		{"diff-uffd", diff, diffMem, "Uffd"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// As the manager prepares a fork's namespace: the TAP down until
			// the VMM holds it, and a permanent neighbour for the guest, so
			// no ARP retry can hide a first packet the guest missed.
			ns := testnet.New(t)
			ns.AddTAP(testnet.TAP{Name: netTap, MAC: testnet.ParseMAC(t, netTapMAC), Addr: netGWCIDR, Down: true})
			q := startVMMIn(t, dir, ns)
			backend := tc.mem
			if tc.backend == "Uffd" {
				requireUffd(t)
				backend = filepath.Join(dir, q.name+".uffd.sock")
				startTestPager(t, backend, tc.mem, false)
			}
			q.must("PUT", "/snapshot/load", map[string]any{"snapshot_path": tc.vmstate,
				"mem_backend": map[string]any{"backend_type": tc.backend, "backend_path": backend}, "resume_vm": true}, 204)
			// The load returned: the TAP must already be attached (a frame
			// sent to a TAP nobody holds is dropped), the stack listening.
			ns.SetUp(netTap)
			if !ns.Carrier(netTap) {
				t.Fatalf("fork %s: %s has no carrier when the load returns: the TAP is not attached", tc.name, netTap)
			}
			ns.Neighbour(netTap, netGuest, testnet.ParseMAC(t, netGuestMAC))
			page := answersAtOnce(t, ns, "fork "+tc.name)
			if page.BootID != boot {
				t.Fatalf("fork %s reports boot_id %s, its source %s", tc.name, page.BootID, boot)
			}
			echoOnce(t, ns, "fork "+tc.name)
			requireClean(t, "fork "+tc.name, q.waitTicks(200))
		})
	}
}

// TestLoadReopensTheTAPByItsStoredNameOrTheOverride: the TAP name is in
// the vmstate; network_overrides renames it; an override for an interface
// the snapshot lacks, or a TAP that is not there, fails the load and
// leaves the process unusable, as in Firecracker.
func TestLoadReopensTheTAPByItsStoredNameOrTheOverride(t *testing.T) {
	src := netNS(t, netTap)
	dir := t.TempDir()
	p := startVMMIn(t, dir, src)
	p.bootNet(false)
	boot := answersAtOnce(t, src, "source").BootID
	p.pause()
	vmstate, mem := filepath.Join(dir, "vmstate"), filepath.Join(dir, "mem")
	p.snapshot("Full", vmstate, mem)
	load := func(q *vmmProc, overrides []map[string]string) (int, string) {
		body := map[string]any{"snapshot_path": vmstate, "mem_backend": map[string]any{"backend_type": "File", "backend_path": mem}, "resume_vm": true}
		if overrides != nil {
			body["network_overrides"] = overrides
		}
		return q.call("PUT", "/snapshot/load", body)
	}

	other := netNS(t, "vmtap7") // no tap0 here
	q := startVMMIn(t, dir, other)
	if code, out := load(q, nil); code != 400 || !strings.Contains(out, "Open tap device failed") || !strings.Contains(out, "No such device") {
		t.Fatalf("load without the stored TAP: %d %s, want 400 Open tap device failed (No such device)", code, out)
	}
	q.fault("PATCH", "/vm", map[string]any{"state": "Resumed"}, "unusable")

	q = startVMMIn(t, dir, other)
	if code, out := load(q, []map[string]string{{"iface_id": "eth9", "host_dev_name": "vmtap7"}}); code != 400 || !strings.Contains(out, "Unknown Network Device") {
		t.Fatalf("override of an unknown interface: %d %s, want 400 Unknown Network Device", code, out)
	}

	if other.Carrier("vmtap7") {
		t.Fatal("vmtap7 has carrier though no VMM opened it: the carrier check cannot tell")
	}
	q = startVMMIn(t, dir, other)
	if code, out := load(q, []map[string]string{{"iface_id": "eth0", "host_dev_name": "vmtap7"}}); code != 204 {
		t.Fatalf("load with network_overrides eth0 -> vmtap7: %d %s", code, out)
	}
	if !other.Carrier("vmtap7") {
		t.Fatal("vmtap7 has no carrier after the load that overrode eth0 onto it")
	}
	if page := answersAtOnce(t, other, "overridden fork"); page.BootID != boot {
		t.Fatalf("overridden fork boot_id %s, source %s", page.BootID, boot)
	}
	var cfg struct {
		Net []netIface `json:"network-interfaces"`
	}
	json.Unmarshal([]byte(q.must("GET", "/vm/config", nil, 200)), &cfg)
	if len(cfg.Net) != 1 || cfg.Net[0].HostDevName != "vmtap7" || cfg.Net[0].GuestMAC != netGuestMAC {
		t.Fatalf("GET /vm/config after the override: %+v, want eth0 on vmtap7 with MAC %s", cfg.Net, netGuestMAC)
	}
	// Its own snapshot stores the overridden name, as Firecracker's does.
	q.pause()
	again := filepath.Join(dir, "again.vmstate")
	q.snapshot("Full", again, filepath.Join(dir, "again.mem"))
	st, err := readVMState(again)
	if err != nil || len(st.Interfaces) != 1 || st.Interfaces[0].HostDevName != "vmtap7" {
		t.Fatalf("vmstate of the overridden VM: %+v, %v; want host_dev_name vmtap7", st, err)
	}
}

// TestPausedGuestAnswersOnlyOnceResumed: frames sent to a paused VM wait in
// its TAP, unread, and are answered when it resumes; the same for a VM
// loaded without resume_vm, whose stack comes up at its first resume.
func TestPausedGuestAnswersOnlyOnceResumed(t *testing.T) {
	ns := netNS(t, netTap)
	dir := t.TempDir()
	p := startVMMIn(t, dir, ns)
	p.bootNet(false)
	answersAtOnce(t, ns, "running guest")
	// The namespace knows the guest's MAC for good, so pings go straight
	// into the TAP instead of waiting on ARP (which gives up after ~3 s).
	ns.Neighbour(netTap, netGuest, testnet.ParseMAC(t, netGuestMAC))
	pinger := ns.NewPinger()
	seq := 10
	frozen := func(what string, resume func()) {
		t.Helper()
		seq++
		read := ns.LinkCounter(netTap, "tx_packets")
		if err := pinger.Send(netGuest, seq); err != nil {
			t.Fatal(err)
		}
		// Only a broken VMM can make this wait pass wrongly; it never fails
		// a correct one.
		if err := pinger.Wait(netGuest, seq, time.Now().Add(500*time.Millisecond)); err == nil {
			t.Fatalf("%s: a paused guest answered a ping", what)
		}
		if n := ns.LinkCounter(netTap, "tx_packets"); n != read {
			t.Fatalf("%s: a paused guest read %d frames from its TAP", what, n-read)
		}
		resume()
		if err := pinger.Wait(netGuest, seq, time.Now().Add(30*time.Second)); err != nil {
			t.Fatalf("%s: the ping that waited in the TAP was not answered after resume: %v", what, err)
		}
	}
	p.pause()
	frozen("paused", p.resume)
	p.pause()
	vmstate, mem := filepath.Join(dir, "vmstate"), filepath.Join(dir, "mem")
	p.snapshot("Full", vmstate, mem)
	p.must("PUT", "/actions", map[string]any{"action_type": "SendCtrlAltDel"}, 204)
	if err := p.waitExit(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	// The exited VMM let go of the TAP: a new one attaches.
	q := startVMMIn(t, dir, ns)
	q.loadFile(vmstate, mem, false, false)
	frozen("loaded, not resumed", q.resume)
	page, err := getGuest(t, ns)
	if err != nil || page.retransmits != 0 {
		t.Fatalf("GET / after the first resume: %+v %v", page, err)
	}
}

// TestPauseResumeCyclesLeakNoFDs: the VMM's open files are the same after
// many pauses and resumes of a networked guest (no TAP or socket opened
// per cycle).
func TestPauseResumeCyclesLeakNoFDs(t *testing.T) {
	ns := netNS(t, netTap)
	dir := t.TempDir()
	p := startVMMIn(t, dir, ns)
	p.bootNet(false)
	answersAtOnce(t, ns, "guest")
	fds := func() int {
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.cmd.Process.Pid))
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	p.pause()
	p.resume()
	before := fds()
	for range 20 {
		p.pause()
		p.resume()
	}
	echoOnce(t, ns, "still here")
	if after := fds(); after > before {
		t.Fatalf("VMM has %d fds after 20 pause/resume cycles, %d before", after, before)
	}
}
