package uffd

import (
	"encoding/binary"
	"testing"
)

// encodeMsg is DecodeMsg's inverse, for tests: it lays out a uffd_msg as
// the kernel does.
func encodeMsg(m Msg) []byte {
	b := make([]byte, MsgSize)
	le := binary.LittleEndian
	b[0] = m.Event
	switch m.Event {
	case EventPagefault:
		le.PutUint64(b[8:], m.Flags)
		le.PutUint64(b[16:], m.Address)
		le.PutUint32(b[24:], m.Ptid)
	case EventRemove, EventUnmap:
		le.PutUint64(b[8:], m.Start)
		le.PutUint64(b[16:], m.End)
	case EventRemap:
		le.PutUint64(b[8:], m.Start)
		le.PutUint64(b[16:], m.End)
		le.PutUint64(b[24:], m.Len)
	case EventFork:
		le.PutUint32(b[8:], m.ForkFD)
	}
	return b
}

func TestDecodeMsgReadsKernelLayout(t *testing.T) {
	tests := []struct {
		name string
		msg  Msg
	}{
		{"pagefault write with thread id", Msg{Event: EventPagefault, Flags: PagefaultFlagWrite, Address: 0x7f0000001234, Ptid: 4242}},
		{"pagefault read", Msg{Event: EventPagefault, Address: 0x1000}},
		{"remove range", Msg{Event: EventRemove, Start: 0x7f0000000000, End: 0x7f0000400000}},
		{"unmap range", Msg{Event: EventUnmap, Start: 0x1000, End: 0x3000}},
		{"remap", Msg{Event: EventRemap, Start: 0x1000, End: 0x9000, Len: 0x2000}},
		{"fork", Msg{Event: EventFork, ForkFD: 17}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DecodeMsg(encodeMsg(tt.msg))
			if err != nil {
				t.Fatalf("DecodeMsg: %v", err)
			}
			if got != tt.msg {
				t.Fatalf("DecodeMsg = %+v, want %+v", got, tt.msg)
			}
		})
	}
}

func TestDecodeMsgFixedOffsets(t *testing.T) {
	// Hand-built bytes, independent of encodeMsg: flags @8, address @16, ptid @24.
	b := make([]byte, MsgSize)
	b[0] = 0x12
	b[8] = 0x01
	b[16], b[17] = 0x00, 0x10 // 0x1000
	b[24] = 7
	m, err := DecodeMsg(b)
	if err != nil {
		t.Fatal(err)
	}
	if m.Flags != 1 || m.Address != 0x1000 || m.Ptid != 7 {
		t.Fatalf("got %+v, want flags=1 address=0x1000 ptid=7", m)
	}
}

func TestDecodeMsgRejectsMalformed(t *testing.T) {
	tests := []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"short", make([]byte, MsgSize-1)},
		{"unknown event zero", make([]byte, MsgSize)},
		{"unknown event 0x17", append([]byte{0x17}, make([]byte, MsgSize-1)...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if m, err := DecodeMsg(tt.b); err == nil {
				t.Fatalf("DecodeMsg(%x) = %+v, want an error", tt.b, m)
			}
		})
	}
}

func FuzzDecodeMsg(f *testing.F) {
	f.Add(encodeMsg(Msg{Event: EventPagefault, Flags: 1, Address: 0xdeadb000, Ptid: 3}))
	f.Add(encodeMsg(Msg{Event: EventRemove, Start: 0x1000, End: 0x5000}))
	f.Add(encodeMsg(Msg{Event: EventRemap, Start: 1, End: 2, Len: 3}))
	f.Add(encodeMsg(Msg{Event: EventFork, ForkFD: 9}))
	f.Add([]byte{0x15})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeMsg(b)
		if err != nil {
			return
		}
		// A decoded message re-encodes to the bytes that carry meaning.
		again, err := DecodeMsg(encodeMsg(m))
		if err != nil || again != m {
			t.Fatalf("round trip of %+v gave %+v, %v", m, again, err)
		}
		_ = m.String()
	})
}
