package emulator

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// guestAgentPort is the vsock port the emulated guest listens on: each
// connection gets one JSON line of the guest's facts (what GET /guest
// answers, boot_id included) and is closed. It is the channel a guest agent
// would use.
const guestAgentPort = 5000

// vsockConfig is the body of PUT /vsock, as Firecracker names it.
type vsockConfig struct {
	VsockID  string `json:"vsock_id,omitempty"` // deprecated, ignored
	GuestCID uint32 `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

// vsockState is the vsock device in the vmstate: its configuration, with
// uds_path exactly as given (a relative path is re-bound relative to the
// restoring VMM's working directory, so each fork binds its own), and the
// last host port handed out (kept from 1.15, as Firecracker keeps it).
type vsockState struct {
	vsockConfig
	LocalPortLast uint32 `json:"local_port_last"`
}

// firstLocalPort - 1 is where Firecracker starts handing out host ports:
// the first host-initiated connection gets 2^30.
const firstLocalPort = 1<<30 - 1

// vsockDevice is the host side of Firecracker's virtio-vsock device as its
// docs/vsock.md and its muxer describe it, and the emulated guest's end:
//   - host-initiated: a client connects to uds_path and sends "CONNECT
//     <port>\n" ("connect" in any case; at least 10 bytes are read, then up
//     to the newline, 32 at most). If the guest listens on port, the client
//     gets "OK <host port>\n" (host ports count up from 2^30) and the
//     connection is the guest's; otherwise, or on a malformed request, it is
//     closed. Nothing is answered while the guest is paused: the client
//     waits, as for a guest whose vCPUs are stopped.
//   - guest-initiated: the guest's connection to host port P is made to a
//     Unix socket listening at uds_path + "_P"; with nobody there it fails.
//
// The socket is bound when the device is created (PUT /vsock, or a load)
// and, as in Firecracker, not unlinked when the VMM exits: whoever restarts
// a VM on the same path must remove the stale socket first.
type vsockDevice struct {
	cfg   vsockConfig
	ln    *net.UnixListener
	log   *slog.Logger
	facts func() ([]byte, error) // the guest agent's one line

	mu            sync.Mutex // guards the fields below
	cond          *sync.Cond // signalled when running or closed changes
	running       bool       // the guest runs: connections are served
	closed        bool
	localPortLast uint32
	conns         map[net.Conn]bool // open host connections, closed with the device

	wg sync.WaitGroup // the accept loop and one goroutine per connection
}

// newVsockDevice binds cfg.UDSPath (relative paths: this process's working
// directory) and starts accepting host connections.
func newVsockDevice(cfg vsockConfig, localPortLast uint32, facts func() ([]byte, error), log *slog.Logger) (*vsockDevice, error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: cfg.UDSPath, Net: "unix"})
	if err != nil {
		var se *os.SyscallError
		if errors.As(err, &se) {
			err = se.Err
		}
		return nil, faultf("Cannot create backend for vsock device: Error binding to the host-side Unix socket: %v", err)
	}
	// Firecracker leaves the socket file behind when it exits.
	ln.SetUnlinkOnClose(false)
	d := &vsockDevice{cfg: cfg, ln: ln, log: log.With("device", "vsock"), facts: facts,
		localPortLast: localPortLast, conns: map[net.Conn]bool{}}
	d.cond = sync.NewCond(&d.mu)
	d.wg.Add(1)
	go d.accept()
	return d, nil
}

func (d *vsockDevice) state() *vsockState {
	d.mu.Lock()
	defer d.mu.Unlock()
	return &vsockState{vsockConfig: d.cfg, LocalPortLast: d.localPortLast}
}

// run and stop follow the guest's vCPUs.
func (d *vsockDevice) run() {
	d.mu.Lock()
	d.running = true
	d.mu.Unlock()
	d.cond.Broadcast()
}

func (d *vsockDevice) stop() {
	d.mu.Lock()
	d.running = false
	d.mu.Unlock()
}

// close stops accepting, closes every host connection and waits for the
// device's goroutines. The socket file stays (see vsockDevice).
func (d *vsockDevice) close() {
	d.mu.Lock()
	d.closed = true
	for c := range d.conns {
		c.Close()
	}
	d.mu.Unlock()
	d.cond.Broadcast()
	d.ln.Close()
	d.wg.Wait()
}

// remove is close plus unlinking the socket, for a device replaced by
// another PUT /vsock (Firecracker removes the old socket then).
func (d *vsockDevice) remove() error {
	d.close()
	if err := os.Remove(d.cfg.UDSPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func (d *vsockDevice) accept() {
	defer d.wg.Done()
	for {
		c, err := d.ln.Accept()
		if err != nil {
			return
		}
		d.mu.Lock()
		if d.closed {
			d.mu.Unlock()
			c.Close()
			return
		}
		d.conns[c] = true
		d.mu.Unlock()
		d.wg.Add(1)
		go d.serveHost(c)
	}
}

// serveHost handles one host-initiated connection.
func (d *vsockDevice) serveHost(c net.Conn) {
	defer d.wg.Done()
	defer func() {
		d.mu.Lock()
		delete(d.conns, c)
		d.mu.Unlock()
		c.Close()
	}()
	port, err := readConnect(c)
	if err != nil {
		d.log.Info("vsock: error adding local-init connection", "error", err)
		return
	}
	d.mu.Lock()
	for !d.running && !d.closed {
		d.cond.Wait()
	}
	if d.closed {
		d.mu.Unlock()
		return
	}
	if port != guestAgentPort {
		// Nobody listens there in the guest: it answers RST.
		d.mu.Unlock()
		d.log.Debug("vsock: host connection to a port the guest does not listen on", "port", port)
		return
	}
	d.localPortLast = (d.localPortLast+1)&^(1<<31) | (1 << 30)
	local := d.localPortLast
	d.mu.Unlock()
	if _, err := fmt.Fprintf(c, "OK %d\n", local); err != nil {
		return
	}
	line, err := d.facts()
	if err != nil {
		return
	}
	c.Write(line)
}

// readConnect reads a host's connect command as Firecracker's muxer does
// (read_local_stream_port): 10 bytes at least, then one at a time up to the
// newline, 32 at most; "connect" in any case, then a decimal u32.
func readConnect(r io.Reader) (uint32, error) {
	var buf [32]byte
	const minRead = 10 // len("connect 0\n")
	if _, err := io.ReadFull(r, buf[:minRead]); err != nil {
		return 0, faultf("Error reading from host-side Unix socket: %v", err)
	}
	n := minRead
	for buf[n-1] != '\n' && n < len(buf) {
		if _, err := io.ReadFull(r, buf[n:n+1]); err != nil {
			return 0, faultf("Error reading from host-side Unix socket: %v", err)
		}
		n++
	}
	words := strings.Fields(string(buf[:n]))
	if len(words) < 2 || strings.ToLower(words[0]) != "connect" {
		return 0, fault("The host made an invalid vsock port connection request.")
	}
	port, err := strconv.ParseUint(words[1], 10, 32)
	if err != nil {
		return 0, fault("The host made an invalid vsock port connection request.")
	}
	return uint32(port), nil
}

// announce is the guest connecting to host port: to the Unix socket
// uds_path_port, writing its facts line and closing. Nobody listening
// there is what a guest sees as a refused connection: logged, no retry.
func (d *vsockDevice) announce(port uint64) {
	path := d.cfg.UDSPath + "_" + strconv.FormatUint(port, 10)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		c, err := net.Dial("unix", path)
		if err != nil {
			d.log.Info("vsock: guest connection to the host refused", "port", port, "path", path, "error", err)
			return
		}
		defer c.Close()
		line, err := d.facts()
		if err == nil {
			c.Write(line)
		}
	}()
}
