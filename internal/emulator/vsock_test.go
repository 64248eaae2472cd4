package emulator

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// startVMMCwd starts a VMM whose working directory is dir (relative
// uds_paths resolve there, as for a manager's VMM in its guest dir).
func startVMMCwd(t *testing.T, dir, version string) *vmmProc {
	t.Helper()
	return startVMMOpts(t, dir, version, func(c *exec.Cmd) error {
		c.Dir = dir
		return c.Start()
	})
}

// vsockConnect is a host-initiated connection: connect to uds, send
// "CONNECT port\n" and read the answer line ("" if the VMM closed the
// connection without one) and, after OK, the guest agent's line.
func vsockConnect(t *testing.T, uds string, cmd string) (ok string, line string) {
	t.Helper()
	c, err := net.Dial("unix", uds)
	if err != nil {
		t.Fatalf("connect to %s: %v", uds, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write([]byte(cmd)); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(c)
	ok, err = r.ReadString('\n')
	if err != nil {
		return "", ""
	}
	line, _ = r.ReadString('\n')
	return ok, line
}

func bootID(t *testing.T, line string) string {
	t.Helper()
	var g GuestStats
	if err := json.Unmarshal([]byte(line), &g); err != nil || g.BootID == "" {
		t.Fatalf("guest agent line %q: %v; want the guest's JSON with a boot_id", line, err)
	}
	return g.BootID
}

// Firecracker's host-initiated protocol: CONNECT <port>\n → OK <host port>\n
// (host ports from 2^30), the connection then the guest's; a port the guest
// does not listen on, or a malformed request, gets the connection closed.
func TestVsockHostInitiatedConnectionsReachTheGuestAgent(t *testing.T) {
	dir := t.TempDir()
	p := startVMMCwd(t, dir, DefaultFirecrackerVersion())
	p.must("PUT", "/vsock", map[string]any{"guest_cid": 3, "uds_path": "v.sock"}, 204)
	p.boot(bootSpec{vcpus: 1, memMib: 16, bootArgs: "forkd.ws_mib=2 forkd.rate=20000"})
	uds := filepath.Join(dir, "v.sock")
	ok, line := vsockConnect(t, uds, "CONNECT 5000\n")
	if ok != "OK 1073741824\n" {
		t.Fatalf("first connection answered %q, want \"OK 1073741824\\n\"", ok)
	}
	id := bootID(t, line)
	if id != p.guest().BootID {
		t.Fatalf("vsock boot_id %s, GET /guest says %s", id, p.guest().BootID)
	}
	if ok, _ := vsockConnect(t, uds, "connect 5000\n"); ok != "OK 1073741825\n" {
		t.Fatalf("second connection (lower case) answered %q, want the next host port", ok)
	}
	for _, bad := range []string{"CONNECT 52\n", "HELLO 5000\n", "CONNECT x\n\n\n\n\n\n\n\n"} {
		if ok, _ := vsockConnect(t, uds, bad); ok != "" {
			t.Errorf("%q answered %q; want the connection closed", bad, ok)
		}
	}
	// Paused, the guest answers once resumed.
	p.pause()
	done := make(chan string, 1)
	go func() {
		c, err := net.Dial("unix", uds)
		if err != nil {
			done <- err.Error()
			return
		}
		defer c.Close()
		c.Write([]byte("CONNECT 5000\n"))
		s, _ := bufio.NewReader(c).ReadString('\n')
		done <- s
	}()
	p.resume()
	if got := <-done; !strings.HasPrefix(got, "OK ") {
		t.Fatalf("a connection made while paused got %q after resume", got)
	}
}

// A guest-initiated connection to host port P goes to uds_path_P. The
// guest announces itself there at boot and again after each restore, with
// the boot_id its memory holds (a restore of the same memory says the same).
func TestVsockGuestInitiatedConnectionsGoToTheSocketOfThePort(t *testing.T) {
	dir := t.TempDir()
	ln, err := net.Listen("unix", filepath.Join(dir, "v.sock_52"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accept := func() string {
		t.Helper()
		ln.(*net.UnixListener).SetDeadline(time.Now().Add(30 * time.Second))
		c, err := ln.Accept()
		if err != nil {
			t.Fatalf("no guest-initiated connection to v.sock_52: %v", err)
		}
		defer c.Close()
		line, _ := bufio.NewReader(c).ReadString('\n')
		return bootID(t, line)
	}
	p := startVMMCwd(t, dir, DefaultFirecrackerVersion())
	p.must("PUT", "/vsock", map[string]any{"guest_cid": 3, "uds_path": "v.sock"}, 204)
	p.boot(bootSpec{vcpus: 1, memMib: 16, track: true, bootArgs: "forkd.ws_mib=2 forkd.rate=20000 forkd.vsock_announce=52"})
	first := accept()
	p.pause()
	vmstate, mem := filepath.Join(dir, "vmstate"), filepath.Join(dir, "mem")
	p.snapshot("Full", vmstate, mem)
	p.cmd.Process.Kill()
	<-p.exited

	// The restore binds the same relative path, here in another directory.
	other := t.TempDir()
	ln2, err := net.Listen("unix", filepath.Join(other, "v.sock_52"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln2.Close()
	ln = ln2 // accept now waits on the restored guest's port
	q := startVMMCwd(t, other, DefaultFirecrackerVersion())
	q.loadFile(vmstate, mem, true, true)
	if again := accept(); again != first {
		t.Fatalf("the restored guest announced boot_id %s, want its memory's %s", again, first)
	}
	if _, err := os.Stat(filepath.Join(other, "v.sock")); err != nil {
		t.Fatalf("the restore did not bind the relative uds_path in its own directory: %v", err)
	}
}

// Firecracker binds uds_path when the device is made and leaves the socket
// file when it exits, so a VM restarted on the same path is refused until
// the stale socket is removed (the manager must remove it). vsock_override
// (1.16) binds elsewhere; before 1.16 the field does not exist.
func TestVsockSocketOutlivesTheVMMAndOverrideRebinds(t *testing.T) {
	dir := t.TempDir()
	p := startVMMCwd(t, dir, "1.16")
	p.must("PUT", "/vsock", map[string]any{"guest_cid": 3, "uds_path": "v.sock"}, 204)
	p.boot(bootSpec{vcpus: 1, memMib: 16, track: true, bootArgs: "forkd.ws_mib=2 forkd.rate=20000"})
	p.pause()
	vmstate, mem := filepath.Join(dir, "vmstate"), filepath.Join(dir, "mem")
	p.snapshot("Full", vmstate, mem)
	// An orderly exit (SIGTERM) closes the device: the file must stay all
	// the same (a SIGKILL could not remove it anyway).
	p.cmd.Process.Signal(syscall.SIGTERM)
	<-p.exited
	if _, err := os.Stat(filepath.Join(dir, "v.sock")); err != nil {
		t.Fatalf("the socket file is gone after the VMM exited (%v); Firecracker leaves it", err)
	}
	q := startVMMCwd(t, dir, "1.16")
	q.fault("PUT", "/snapshot/load", map[string]any{"snapshot_path": vmstate,
		"mem_backend": map[string]any{"backend_type": "File", "backend_path": mem}}, "address already in use")

	r := startVMMCwd(t, dir, "1.16")
	r.must("PUT", "/snapshot/load", map[string]any{"snapshot_path": vmstate,
		"mem_backend":    map[string]any{"backend_type": "File", "backend_path": mem},
		"vsock_override": map[string]any{"uds_path": "w.sock"}, "resume_vm": true}, 204)
	if ok, _ := vsockConnect(t, filepath.Join(dir, "w.sock"), "CONNECT 5000\n"); !strings.HasPrefix(ok, "OK ") {
		t.Fatalf("the overridden socket answered %q", ok)
	}
	var cfg map[string]json.RawMessage
	json.Unmarshal([]byte(r.must("GET", "/vm/config", nil, 200)), &cfg)
	if !strings.Contains(string(cfg["vsock"]), `"uds_path":"w.sock"`) {
		t.Fatalf("GET /vm/config vsock = %s, want the override", cfg["vsock"])
	}

	s := startVMMCwd(t, dir, "1.15")
	s.fault("PUT", "/snapshot/load", map[string]any{"snapshot_path": vmstate,
		"mem_backend":    map[string]any{"backend_type": "File", "backend_path": mem},
		"vsock_override": map[string]any{"uds_path": "x.sock"}}, "unknown field `vsock_override`")
}

// From 1.15 the host port counter is in the snapshot (a restored VM goes on
// counting); before, it starts afresh at 2^30.
func TestVsockHostPortsAcrossARestoreFollowTheRelease(t *testing.T) {
	for _, tc := range []struct {
		version string
		want    string
	}{{"1.14", "OK 1073741824\n"}, {"1.15", "OK 1073741825\n"}} {
		t.Run(tc.version, func(t *testing.T) {
			dir := t.TempDir()
			p := startVMMCwd(t, dir, tc.version)
			p.must("PUT", "/vsock", map[string]any{"guest_cid": 3, "uds_path": "v.sock"}, 204)
			p.boot(bootSpec{vcpus: 1, memMib: 16, track: true, bootArgs: "forkd.ws_mib=2 forkd.rate=20000"})
			vsockConnect(t, filepath.Join(dir, "v.sock"), "CONNECT 5000\n")
			p.pause()
			vmstate, mem := filepath.Join(dir, "vmstate"), filepath.Join(dir, "mem")
			p.snapshot("Full", vmstate, mem)
			p.cmd.Process.Kill()
			<-p.exited
			os.Remove(filepath.Join(dir, "v.sock"))
			q := startVMMCwd(t, dir, tc.version)
			q.loadFile(vmstate, mem, true, true)
			if ok, _ := vsockConnect(t, filepath.Join(dir, "v.sock"), "CONNECT 5000\n"); ok != tc.want {
				t.Fatalf("first connection after the restore: %q, want %q", ok, tc.want)
			}
		})
	}
}

func TestVsockAnnounceBootArgIsChecked(t *testing.T) {
	for _, bad := range []string{"forkd.vsock_announce=0", fmt.Sprintf("forkd.vsock_announce=%d", uint64(1)<<32)} {
		if _, err := parseBootArgs(bad); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}
