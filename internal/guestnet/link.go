package guestnet

import (
	"errors"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// link is the guest NIC's link endpoint on a TAP: raw Ethernet frames
// behind the TAP's vnet header (gVisor's ethernet endpoint wraps it to add
// and parse the Ethernet header). One goroutine reads the TAP, parked in
// the netpoller while no frame waits: an idle guest costs no CPU.
//
// Frames flow only while the link runs (the VM is resumed). While it is
// stopped the reader does not read, so frames wait in the TAP's queue, and
// frames the stack sends are dropped: a paused guest neither receives nor
// sends.
type link struct {
	tap *TAP
	mac tcpip.LinkAddress
	log *slog.Logger

	mtu atomic.Uint32

	mu   sync.Mutex // guards the fields below
	cond sync.Cond  // signalled on every change of running, reading, closed
	// dispatcher is the stack's (the ethernet endpoint), set by Attach.
	dispatcher stack.NetworkDispatcher
	running    bool // frames flow
	// reading: the reader is past the gate (in a read or delivering a
	// frame). stop waits for it to clear, so no frame is delivered once
	// stop returns.
	reading bool
	closed  bool
	started bool          // the reader goroutine was started
	done    chan struct{} // closed when the reader exits

	// keepReading is a test switch: stop leaves the gate open, so the twin
	// test can show the paused-guest check catches a guest that reads on.
	keepReading bool

	// Counters (frames): delivered to the stack, written to the TAP, and
	// dropped on send because the link was stopped or the write failed.
	rx, tx, txDropped atomic.Uint64
}

var _ stack.LinkEndpoint = (*link)(nil)

func newLink(tap *TAP, mac tcpip.LinkAddress, mtu uint32, log *slog.Logger) *link {
	l := &link{tap: tap, mac: mac, log: log, done: make(chan struct{})}
	l.cond.L = &l.mu
	l.mtu.Store(mtu)
	return l
}

// startReader starts the reader goroutine; it waits at the gate until run.
func (l *link) startReader() {
	l.mu.Lock()
	l.started = true
	l.mu.Unlock()
	go l.readLoop()
}

// run opens the gate: frames waiting in the TAP are delivered, and sends
// reach the TAP.
func (l *link) run() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || l.running {
		return
	}
	// Clear stop's deadline before the reader can read again.
	l.tap.f.SetReadDeadline(time.Time{})
	l.running = true
	l.cond.Broadcast()
}

// stop closes the gate and returns once the reader has parked, so no frame
// is read or delivered after it returns.
func (l *link) stop() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.running || l.keepReading {
		return
	}
	l.running = false
	// Interrupt a read parked in the netpoller.
	l.tap.f.SetReadDeadline(time.Now())
	for l.reading {
		l.cond.Wait()
	}
}

// close stops the reader for good; the TAP itself stays open (its owner
// closes it).
func (l *link) close() {
	l.mu.Lock()
	l.running = false
	l.closed = true
	l.tap.f.SetReadDeadline(time.Now())
	l.cond.Broadcast()
	started := l.started
	l.mu.Unlock()
	if started {
		<-l.done
	}
}

func (l *link) readLoop() {
	defer close(l.done)
	buf := make([]byte, maxFrame)
	for {
		l.mu.Lock()
		l.reading = false
		l.cond.Broadcast()
		for !l.running && !l.closed {
			l.cond.Wait()
		}
		if l.closed {
			l.mu.Unlock()
			return
		}
		l.reading = true
		d := l.dispatcher
		l.mu.Unlock()

		n, err := l.tap.f.Read(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue // stop or close: back to the gate
			}
			// The TAP fd was closed under us (its owner closes it only
			// after the guest), or the device is gone: nothing more will
			// come. Park until close.
			l.log.Warn("guest NIC: reading the TAP failed; the NIC receives nothing more", "tap", l.tap.name, "error", err)
			l.mu.Lock()
			l.reading = false
			l.cond.Broadcast()
			for !l.closed {
				l.cond.Wait()
			}
			l.mu.Unlock()
			return
		}
		if n <= vnetHdrLen+header.EthernetMinimumSize || d == nil {
			continue
		}
		// The vnet header carries no offload (none was negotiated): skip it.
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
			Payload: buffer.MakeWithData(append([]byte(nil), buf[vnetHdrLen:n]...)),
		})
		d.DeliverNetworkPacket(0, pkt) // the ethernet endpoint reads the EtherType
		pkt.DecRef()
		l.rx.Add(1)
	}
}

// WritePackets writes each frame to the TAP behind an empty vnet header, or
// drops it while the link is stopped.
func (l *link) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, pkt := range pkts.AsSlice() {
		n++
		l.mu.Lock()
		running := l.running
		l.mu.Unlock()
		if !running {
			l.txDropped.Add(1)
			continue
		}
		frame := make([]byte, vnetHdrLen, vnetHdrLen+pkt.Size())
		for _, s := range pkt.AsSlices() {
			frame = append(frame, s...)
		}
		// One write is one frame; a TAP never takes part of one.
		if _, err := l.tap.f.Write(frame); err != nil {
			l.txDropped.Add(1)
			continue
		}
		l.tx.Add(1)
	}
	return n, nil
}

// The rest is stack.LinkEndpoint plumbing.

func (l *link) MTU() uint32                                  { return l.mtu.Load() }
func (l *link) SetMTU(mtu uint32)                            { l.mtu.Store(mtu) }
func (l *link) MaxHeaderLength() uint16                      { return 0 }
func (l *link) LinkAddress() tcpip.LinkAddress               { return l.mac }
func (l *link) SetLinkAddress(tcpip.LinkAddress)             {}
func (l *link) Capabilities() stack.LinkEndpointCapabilities { return 0 }
func (l *link) ARPHardwareType() header.ARPHardwareType {
	return header.ARPHardwareNone // the ethernet wrapper says Ether
}
func (l *link) AddHeader(*stack.PacketBuffer)        {}
func (l *link) ParseHeader(*stack.PacketBuffer) bool { return true }
func (l *link) SetOnCloseAction(func())              {}
func (l *link) Close()                               {}
func (l *link) Wait()                                {}

func (l *link) Attach(d stack.NetworkDispatcher) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.dispatcher = d
}

func (l *link) IsAttached() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dispatcher != nil
}
