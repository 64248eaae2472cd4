package instance

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/api"
)

// vsockHello connects to an instance's vsock socket as a host client does
// (CONNECT 5000) and returns the pid of the process serving the socket
// (SO_PEERCRED) and the boot_id the guest agent answered.
func vsockHello(t *testing.T, in api.Instance) (pid int, bootID string) {
	t.Helper()
	if in.Vsock == nil {
		t.Fatalf("instance %s has no vsock", in.Name)
	}
	c, err := net.Dial("unix", in.Vsock.UDSPath)
	if err != nil {
		t.Fatalf("connect to %s's vsock %s: %v", in.Name, in.Vsock.UDSPath, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	raw, _ := c.(*net.UnixConn).SyscallConn()
	raw.Control(func(fd uintptr) {
		if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
			pid = int(cred.Pid)
		}
	})
	fmt.Fprintf(c, "CONNECT 5000\n")
	r := bufio.NewReader(c)
	ok, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(ok, "OK ") {
		t.Fatalf("%s's vsock answered %q (%v), want OK <port>", in.Name, ok, err)
	}
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("%s's guest agent: %v", in.Name, err)
	}
	var facts struct {
		BootID string `json:"boot_id"`
	}
	if err := json.Unmarshal([]byte(line), &facts); err != nil || facts.BootID == "" {
		t.Fatalf("%s's guest agent line %q: %v", in.Name, line, err)
	}
	return pid, facts.BootID
}

// Every VM gets a vsock device whose socket is in its own dir; a fork's
// restore binds the fork's own socket (the vmstate holds a path relative to
// the VM's dir), served by the fork's own VMM, and its guest, running the
// source's memory, reports the source's boot_id.
func TestEveryForkHasItsOwnVsock(t *testing.T) {
	m := newTestManager(t)
	src := createRunning(t, m, "src")
	if src.Vsock == nil || src.Vsock.CID != guestCID {
		t.Fatalf("a new VM's vsock is %+v, want CID %d", src.Vsock, guestCID)
	}
	pid, boot := vsockHello(t, src)
	if pid != src.Pid {
		t.Fatalf("src's vsock is served by pid %d, its VMM is %d", pid, src.Pid)
	}
	action(t, m, "src", "standby")
	socks := map[string]string{}
	for i := 0; i < 3; i++ {
		f := fork(t, m, "src", api.ForkRequest{Name: fmt.Sprintf("f%d", i), TargetState: api.StateRunning})
		g, _ := m.layout.Guest(f.ID)
		if f.Vsock == nil || filepath.Dir(f.Vsock.UDSPath) != g.Dir {
			t.Fatalf("fork %s's vsock %+v is not in its own dir %s", f.Name, f.Vsock, g.Dir)
		}
		if other, ok := socks[f.Vsock.UDSPath]; ok {
			t.Fatalf("forks %s and %s share the vsock socket %s", other, f.Name, f.Vsock.UDSPath)
		}
		socks[f.Vsock.UDSPath] = f.Name
		pid, id := vsockHello(t, f)
		if pid != f.Pid {
			t.Fatalf("fork %s's vsock is served by pid %d, not its own VMM (pid %d)", f.Name, pid, f.Pid)
		}
		if id != boot {
			t.Fatalf("fork %s reports boot_id %s, want its source's %s", f.Name, id, boot)
		}
	}
	// The source restores onto its own socket again (the stale file its
	// dead VMM left is removed first).
	in := action(t, m, "src", "restore")
	if pid, id := vsockHello(t, in); pid != in.Pid || id != boot {
		t.Fatalf("restored src: vsock served by %d (VMM %d), boot_id %s (want %s)", pid, in.Pid, id, boot)
	}
	// A live fork too.
	live := fork(t, m, "src", api.ForkRequest{Name: "live", FromRunning: true, TargetState: api.StateRunning})
	if pid, _ := vsockHello(t, live); pid != live.Pid {
		t.Fatalf("live fork's vsock served by %d, its VMM is %d", pid, live.Pid)
	}
	// Stopped, the socket is gone with the VMM; started again, it is back.
	stopped := action(t, m, "f0", "stop")
	if _, err := net.Dial("unix", stopped.Vsock.UDSPath); err == nil {
		t.Fatalf("a stopped VM's vsock still answers")
	}
	started := action(t, m, "f0", "start")
	if pid, id := vsockHello(t, started); pid != started.Pid || id == boot {
		t.Fatalf("restarted f0: vsock served by %d (VMM %d), boot_id %s (want a new boot's)", pid, started.Pid, id)
	}
}
