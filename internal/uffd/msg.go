package uffd

import (
	"encoding/binary"
	"fmt"
)

// Msg is a decoded uffd_msg. Which fields are set depends on Event:
//   - EventPagefault: Flags (PagefaultFlag*), Address, Ptid (with FeatureThreadID)
//   - EventRemove, EventUnmap: Start, End (End exclusive)
//   - EventRemap: Start (old address), End (new address), Len
//   - EventFork: ForkFD (the child's userfaultfd, already installed in this process)
type Msg struct {
	Event   uint8
	Flags   uint64
	Address uint64
	Ptid    uint32
	Start   uint64
	End     uint64
	Len     uint64
	ForkFD  uint32
}

// DecodeMsg decodes one 32-byte uffd_msg (little-endian, as on every
// architecture forkd runs on). It rejects short input and unknown events.
func DecodeMsg(b []byte) (Msg, error) {
	if len(b) < MsgSize {
		return Msg{}, fmt.Errorf("decode uffd_msg: %d bytes, want %d", len(b), MsgSize)
	}
	le := binary.LittleEndian
	m := Msg{Event: b[0]}
	switch m.Event {
	case EventPagefault:
		m.Flags = le.Uint64(b[8:])
		m.Address = le.Uint64(b[16:])
		m.Ptid = le.Uint32(b[24:])
	case EventRemove, EventUnmap:
		m.Start = le.Uint64(b[8:])
		m.End = le.Uint64(b[16:])
	case EventRemap:
		m.Start = le.Uint64(b[8:])
		m.End = le.Uint64(b[16:])
		m.Len = le.Uint64(b[24:])
	case EventFork:
		m.ForkFD = le.Uint32(b[8:])
	default:
		return Msg{}, fmt.Errorf("decode uffd_msg: unknown event %#x", m.Event)
	}
	return m, nil
}

// String names the event for logs.
func (m Msg) String() string {
	switch m.Event {
	case EventPagefault:
		return fmt.Sprintf("pagefault addr=%#x flags=%#x", m.Address, m.Flags)
	case EventRemove:
		return fmt.Sprintf("remove [%#x,%#x)", m.Start, m.End)
	case EventUnmap:
		return fmt.Sprintf("unmap [%#x,%#x)", m.Start, m.End)
	case EventRemap:
		return fmt.Sprintf("remap %#x->%#x len=%d", m.Start, m.End, m.Len)
	case EventFork:
		return fmt.Sprintf("fork ufd=%d", m.ForkFD)
	}
	return fmt.Sprintf("event %#x", m.Event)
}
