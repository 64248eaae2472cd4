package guestnet

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/testnet"
)

// The addresses of Firecracker's clone example, which forkd uses too; they
// exist only inside each test's own namespace.
var (
	guestAddr = netip.MustParseAddr("169.254.0.21")
	gwPrefix  = netip.MustParsePrefix("169.254.0.22/30")
)

const (
	guestMAC = "02:fc:00:00:00:05"
	tapMAC   = "02:fc:00:00:00:06"
	tapName  = "tap0"
)

// testGuest makes a namespace with a TAP and starts a guest on it from this
// process (the TAP is opened inside the namespace; the guest's goroutines
// then run anywhere, as the fd is bound to the namespace).
func testGuest(t *testing.T) (*testnet.NS, *Guest, *TAP) {
	t.Helper()
	ns := testnet.New(t)
	ns.AddTAP(testnet.TAP{Name: tapName, MAC: testnet.ParseMAC(t, tapMAC), Addr: gwPrefix})
	var tap *TAP
	ns.Do(func() error {
		var err error
		tap, err = OpenTAP(tapName)
		return err
	})
	ip, err := ParseIPArg("console=ttyS0 ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off")
	if err != nil {
		t.Fatal(err)
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]string{"boot_id": "test", "path": r.URL.Path})
	})
	g, err := Start(Config{NICs: []NIC{{TAP: tap, MAC: testnet.ParseMAC(t, guestMAC)}}, IP: ip, HTTP: h})
	if err != nil {
		tap.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		g.Close()
		tap.Close()
	})
	return ns, g, tap
}

func TestGuestAnswersPingEchoAndHTTP(t *testing.T) {
	ns, g, _ := testGuest(t)
	g.Run()
	p := ns.NewPinger()
	if err := p.Ping(guestAddr, 1, 30*time.Second); err != nil {
		t.Fatalf("first ping: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := ns.Dial(ctx, "169.254.0.21:7")
	if err != nil {
		t.Fatalf("connect to the echo port: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	msg := strings.Repeat("forkd echo ", 1000) // several segments
	go io.WriteString(c, msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
		t.Fatalf("echo: read %d bytes (err %v), want the %d sent", len(got), err, len(msg))
	}
	resp, err := ns.HTTPClient(30 * time.Second).Get("http://169.254.0.21/")
	if err != nil {
		t.Fatalf("GET /: %v", err)
	}
	defer resp.Body.Close()
	var body map[string]string
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || resp.StatusCode != 200 || body["boot_id"] != "test" {
		t.Fatalf("GET /: status %d, body %v (%v); want 200 with the handler's JSON", resp.StatusCode, body, err)
	}
	st := g.Stats()
	if len(st) != 1 || st[0].RxFrames == 0 || st[0].TxFrames == 0 {
		t.Fatalf("NIC counters %+v: want frames both ways", st)
	}
}

// TestStoppedGuestLeavesFramesInTheTAP: while stopped the guest reads
// nothing (the frame waits in the TAP's queue) and answers nothing; Run
// delivers what waited.
func TestStoppedGuestLeavesFramesInTheTAP(t *testing.T) {
	if err := checkStoppedGuest(t, false); err != nil {
		t.Fatal(err)
	}
}

// Twin: a guest whose Stop leaves the link reading must be caught.
func TestStoppedGuestCheckCatchesAGuestThatReadsOn(t *testing.T) {
	if err := checkStoppedGuest(t, true); err == nil {
		t.Fatal("the stopped-guest check passed a guest that kept reading its TAP")
	}
}

func checkStoppedGuest(t *testing.T, keepReading bool) error {
	ns, g, _ := testGuest(t)
	g.links[0].keepReading = keepReading
	// The host knows the guest's MAC, so a ping goes straight into the TAP
	// instead of waiting on ARP (whose retries give up in ~3 s).
	ns.Neighbour(tapName, guestAddr, testnet.ParseMAC(t, guestMAC))
	g.Run()
	p := ns.NewPinger()
	if err := p.Ping(guestAddr, 1, 30*time.Second); err != nil {
		t.Fatalf("ping while running: %v", err)
	}
	g.Stop()
	read := ns.LinkCounter(tapName, "tx_packets") // frames the guest took from the TAP
	if err := p.Send(guestAddr, 2); err != nil {
		t.Fatal(err)
	}
	// A stopped guest must not answer. This wait can only let a broken
	// guest pass, never fail a correct one.
	if err := p.Wait(guestAddr, 2, time.Now().Add(500*time.Millisecond)); err == nil {
		return fmt.Errorf("a stopped guest answered a ping")
	}
	if now := ns.LinkCounter(tapName, "tx_packets"); now != read {
		return fmt.Errorf("a stopped guest read %d frames from its TAP", now-read)
	}
	g.Run()
	if err := p.Wait(guestAddr, 2, time.Now().Add(30*time.Second)); err != nil {
		t.Fatalf("the ping sent while stopped was not answered after Run: %v", err)
	}
	return nil
}

func TestOpenTAPRefusesWhatFirecrackerWouldNotOpen(t *testing.T) {
	ns := testnet.New(t)
	ns.AddTAP(testnet.TAP{Name: tapName})
	ns.Do(func() error {
		for _, tc := range []struct{ name, want string }{
			{"nosuchtap", "No such device (os error 19)"},
			{"lo", "Invalid argument (os error 22)"}, // not a TAP
			{"waytoolongtapname", "Invalid interface name"},
		} {
			if tap, err := OpenTAP(tc.name); err == nil || !strings.Contains(err.Error(), tc.want) {
				if tap != nil {
					tap.Close()
				}
				t.Errorf("OpenTAP(%q) = %v, want an error containing %q", tc.name, err, tc.want)
			}
		}
		tap, err := OpenTAP(tapName)
		if err != nil {
			return err
		}
		defer tap.Close()
		// A TAP is one VM's: a second attach is refused, as for Firecracker.
		if again, err := OpenTAP(tapName); err == nil || !strings.Contains(err.Error(), "Device or resource busy") {
			if again != nil {
				again.Close()
			}
			t.Errorf("second OpenTAP(%s) = %v, want EBUSY", tapName, err)
		}
		return nil
	})
}

// TestGuestCloseLeavesNothing: goroutines and fds come back to their
// baseline after Close (the TAP is the caller's and closed separately).
func TestGuestCloseLeavesNothing(t *testing.T) {
	ns := testnet.New(t)
	ns.AddTAP(testnet.TAP{Name: tapName, Addr: gwPrefix})
	ip, _ := ParseIPArg("ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off")
	baseG, baseFD := runtime.NumGoroutine(), countFDs(t)
	for i := range 3 {
		var tap *TAP
		ns.Do(func() error {
			var err error
			tap, err = OpenTAP(tapName)
			return err
		})
		g, err := Start(Config{NICs: []NIC{{TAP: tap, MAC: testnet.ParseMAC(t, guestMAC)}}, IP: ip})
		if err != nil {
			t.Fatal(err)
		}
		g.Run()
		if i == 1 {
			g.Stop() // closing a stopped guest must not hang on paused workers
		}
		g.Close()
		tap.Close()
	}
	deadline := time.Now().Add(30 * time.Second)
	for runtime.NumGoroutine() > baseG && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > baseG {
		buf := make([]byte, 1<<20)
		t.Fatalf("%d goroutines after Close, %d before:\n%s", n, baseG, buf[:runtime.Stack(buf, true)])
	}
	if n := countFDs(t); n > baseFD {
		t.Fatalf("%d fds after Close, %d before", n, baseFD)
	}
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
