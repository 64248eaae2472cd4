package guestnet

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// Ports the guest serves on its address.
const (
	EchoPort = 7
	HTTPPort = 80
)

// DefaultMTU is a virtio-net guest's MTU when the device advertises none.
const DefaultMTU = 1500

// NIC is one guest network interface: the TAP behind it (owned by the
// caller, which must keep it open while the guest lives) and the MAC the
// guest uses on it.
type NIC struct {
	TAP *TAP
	MAC net.HardwareAddr
	MTU uint32 // 0: DefaultMTU
}

// Config is what the guest boots (or resumes) with.
type Config struct {
	// NICs are eth0, eth1, ... in order.
	NICs []NIC
	// IP is the address of one NIC (nil: the guest has no address and
	// answers nothing but its link layer).
	IP *IPConfig
	// HTTP serves port 80.
	HTTP http.Handler
	Log  *slog.Logger
}

// Guest is a running guest network stack. It starts stopped: nothing is
// read from or written to a TAP until Run.
type Guest struct {
	stack *stack.Stack
	links []*link
	log   *slog.Logger

	echo *gonet.TCPListener
	http *http.Server
	wg   sync.WaitGroup // the echo accept loop, its connections, the HTTP server

	connsMu sync.Mutex
	conns   map[net.Conn]struct{} // open echo connections, closed by Close
	closing bool                  // guarded by connsMu

	runMu   sync.Mutex // serialises Run, Stop and Close
	running bool       // guarded by runMu
	closed  bool       // guarded by runMu
}

// Start builds the guest's stack on cfg's NICs: each NIC attached to its
// TAP, the address and routes of cfg.IP, and the TCP echo and HTTP
// listeners. When it returns, everything is in place and only waits for
// Run; a frame that arrives before Run waits in the TAP.
func Start(cfg Config) (*Guest, error) {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	g := &Guest{stack: s, log: log, conns: map[net.Conn]struct{}{}}
	fail := func(err error) (*Guest, error) {
		g.teardown()
		return nil, err
	}
	for i, n := range cfg.NICs {
		if len(n.MAC) != 6 {
			return fail(fmt.Errorf("guest NIC eth%d: MAC %q is not 6 bytes", i, n.MAC))
		}
		mtu := n.MTU
		if mtu == 0 {
			mtu = DefaultMTU
		}
		l := newLink(n.TAP, tcpip.LinkAddress(n.MAC), mtu, log)
		g.links = append(g.links, l)
		id := tcpip.NICID(i + 1)
		name := fmt.Sprintf("eth%d", i)
		if err := s.CreateNICWithOptions(id, ethernet.New(l), stack.NICOptions{Name: name}); err != nil {
			return fail(fmt.Errorf("guest NIC %s: %s", name, err))
		}
		l.startReader()
	}
	if cfg.IP != nil {
		if i, ok := cfg.IP.NIC(len(cfg.NICs)); !ok {
			// What Linux does with an ip= for a device it does not have.
			log.Warn("guest: ip= names a device the guest does not have; no address configured",
				"device", cfg.IP.Device, "nics", len(cfg.NICs))
		} else if err := g.configureIP(tcpip.NICID(i+1), cfg.IP); err != nil {
			return fail(err)
		}
	}
	if err := g.listen(cfg.HTTP); err != nil {
		return fail(err)
	}
	return g, nil
}

func (g *Guest) configureIP(id tcpip.NICID, ip *IPConfig) error {
	addr := tcpip.AddrFrom4(ip.Address.Addr().As4())
	pa := tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: addr, PrefixLen: ip.Address.Bits()}}
	if err := g.stack.AddProtocolAddress(id, pa, stack.AddressProperties{}); err != nil {
		return fmt.Errorf("guest: add address %s: %s", ip.Address, err)
	}
	routes := []tcpip.Route{{Destination: pa.AddressWithPrefix.Subnet(), NIC: id}}
	if ip.Gateway.IsValid() {
		routes = append(routes, tcpip.Route{Destination: header.IPv4EmptySubnet,
			Gateway: tcpip.AddrFrom4(ip.Gateway.As4()), NIC: id})
	}
	g.stack.SetRouteTable(routes)
	return nil
}

// listen opens the echo and HTTP listeners on every address of the guest.
func (g *Guest) listen(h http.Handler) error {
	echo, err := gonet.ListenTCP(g.stack, tcpip.FullAddress{Port: EchoPort}, ipv4.ProtocolNumber)
	if err != nil {
		return fmt.Errorf("guest: listen on TCP port %d: %w", EchoPort, err)
	}
	g.echo = echo
	web, err := gonet.ListenTCP(g.stack, tcpip.FullAddress{Port: HTTPPort}, ipv4.ProtocolNumber)
	if err != nil {
		return fmt.Errorf("guest: listen on TCP port %d: %w", HTTPPort, err)
	}
	if h == nil {
		h = http.NotFoundHandler()
	}
	g.http = &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 60 * time.Second,
		ErrorLog: slog.NewLogLogger(g.log.Handler(), slog.LevelDebug)}
	g.wg.Add(2)
	go func() {
		defer g.wg.Done()
		g.http.Serve(web) // returns when Close closes the server
	}()
	go func() {
		defer g.wg.Done()
		g.serveEcho()
	}()
	return nil
}

func (g *Guest) serveEcho() {
	for {
		c, err := g.echo.Accept()
		if err != nil {
			return // Close shut the listener
		}
		g.connsMu.Lock()
		if g.closing {
			g.connsMu.Unlock()
			c.Close()
			return
		}
		g.conns[c] = struct{}{}
		g.wg.Add(1)
		g.connsMu.Unlock()
		go func() {
			defer g.wg.Done()
			io.Copy(c, c)
			c.Close()
			g.connsMu.Lock()
			delete(g.conns, c)
			g.connsMu.Unlock()
		}()
	}
}

// Run lets frames flow: what waited in the TAPs is delivered, and the TCP
// workers run.
func (g *Guest) Run() {
	g.runMu.Lock()
	defer g.runMu.Unlock()
	if g.running || g.closed {
		return
	}
	g.stack.Resume()
	for _, l := range g.links {
		l.run()
	}
	g.running = true
}

// Stop freezes the guest's network: when it returns, no frame is read from
// a TAP or written to one until Run.
func (g *Guest) Stop() {
	g.runMu.Lock()
	defer g.runMu.Unlock()
	if !g.running {
		return
	}
	for _, l := range g.links {
		l.stop()
	}
	g.stack.Pause()
	g.running = false
}

// Close tears the stack down and stops every goroutine it started. The TAPs
// stay open: they are the caller's.
func (g *Guest) Close() {
	g.runMu.Lock()
	defer g.runMu.Unlock()
	if g.closed {
		return
	}
	if !g.running {
		g.stack.Resume() // paused workers must run to exit
	}
	g.closed, g.running = true, false
	g.teardown()
}

func (g *Guest) teardown() {
	for _, l := range g.links {
		l.close()
	}
	if g.http != nil {
		g.http.Close()
	}
	if g.echo != nil {
		g.echo.Close()
	}
	g.connsMu.Lock()
	g.closing = true
	for c := range g.conns {
		c.Close()
	}
	g.connsMu.Unlock()
	g.wg.Wait()
	g.stack.Destroy()
}

// Stats are a guest NIC's frame counters.
type Stats struct {
	Name                     string
	RxFrames, TxFrames, Drop uint64
}

// Stats returns every NIC's counters.
func (g *Guest) Stats() []Stats {
	out := make([]Stats, len(g.links))
	for i, l := range g.links {
		out[i] = Stats{Name: fmt.Sprintf("eth%d", i), RxFrames: l.rx.Load(), TxFrames: l.tx.Load(), Drop: l.txDropped.Load()}
	}
	return out
}
