package uffd

import (
	"encoding/json"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseHandshakeAcceptsFirecrackerFormats(t *testing.T) {
	tests := []struct {
		name    string
		payload string
		want    []Region
	}{
		{
			name:    "firecracker 1.12+ sends both page sizes",
			payload: `[{"base_host_virt_addr":140185423577088,"size":1073741824,"offset":0,"page_size":4096,"page_size_kib":4096}]`,
			want:    []Region{{BaseHostVirtAddr: 140185423577088, Size: 1 << 30, PageSize: 4096, PageSizeKiB: 4096}},
		},
		{
			name:    "firecracker 1.11 sends only page_size_kib in bytes",
			payload: `[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096}]`,
			want:    []Region{{BaseHostVirtAddr: 4096, Size: 8192, PageSize: 4096, PageSizeKiB: 4096}},
		},
		{
			name:    "only page_size",
			payload: `[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]`,
			want:    []Region{{BaseHostVirtAddr: 4096, Size: 4096, PageSize: 4096}},
		},
		{
			name: "two regions contiguous in the file, 2 MiB pages",
			payload: `[{"base_host_virt_addr":2097152,"size":4194304,"offset":0,"page_size":2097152},` +
				`{"base_host_virt_addr":16777216,"size":2097152,"offset":4194304,"page_size":2097152}]`,
			want: []Region{
				{BaseHostVirtAddr: 2 << 20, Size: 4 << 20, PageSize: 2 << 20},
				{BaseHostVirtAddr: 16 << 20, Size: 2 << 20, Offset: 4 << 20, PageSize: 2 << 20},
			},
		},
		{
			name:    "unknown fields from newer senders are ignored",
			payload: `[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"future":true}]`,
			want:    []Region{{BaseHostVirtAddr: 4096, Size: 4096, PageSize: 4096}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseHandshake([]byte(tt.payload))
			if err != nil {
				t.Fatalf("ParseHandshake: %v", err)
			}
			if len(got) != len(tt.want) {
				t.Fatalf("got %d regions %+v, want %+v", len(got), got, tt.want)
			}
			for i := range got {
				if got[i] != tt.want[i] {
					t.Errorf("region %d = %+v, want %+v", i, got[i], tt.want[i])
				}
			}
		})
	}
}

func TestParseHandshakeRejectsMalformed(t *testing.T) {
	tests := []struct {
		name, payload, wantErr string
	}{
		{"bad json", `[{"base_host_virt_addr":`, "unexpected end"},
		{"not an array", `{"size":4096}`, "cannot unmarshal"},
		{"empty array", `[]`, "no regions"},
		{"trailing second message", `[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}][]`, "invalid character"},
		{"no page size", `[{"base_host_virt_addr":4096,"size":4096,"offset":0}]`, "no page size"},
		{"page sizes disagree", `[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4}]`, "disagrees"},
		{"odd page size", `[{"base_host_virt_addr":8192,"size":8192,"offset":0,"page_size":8192}]`, "page size 8192"},
		{"zero size", `[{"base_host_virt_addr":4096,"size":0,"offset":0,"page_size":4096}]`, "empty or not aligned"},
		{"unaligned address", `[{"base_host_virt_addr":4097,"size":4096,"offset":0,"page_size":4096}]`, "not aligned"},
		{"unaligned offset", `[{"base_host_virt_addr":4096,"size":4096,"offset":12,"page_size":4096}]`, "not aligned"},
		{"address wraps", `[{"base_host_virt_addr":18446744073709547520,"size":8192,"offset":0,"page_size":4096}]`, "overflows"},
		{"mixed page sizes", `[{"base_host_virt_addr":0,"size":2097152,"offset":0,"page_size":2097152},{"base_host_virt_addr":4194304,"size":4096,"offset":2097152,"page_size":4096}]`, "differs"},
		{"overlap in memory", `[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":8192,"size":4096,"offset":8192,"page_size":4096}]`, "overlap in memory"},
		{"overlap in file", `[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":65536,"size":4096,"offset":4096,"page_size":4096}]`, "overlap in the file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseHandshake([]byte(tt.payload))
			if err == nil {
				t.Fatalf("ParseHandshake(%s) = %+v, want error containing %q", tt.payload, got, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("ParseHandshake error %q, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

func FuzzParseHandshake(f *testing.F) {
	f.Add([]byte(`[{"base_host_virt_addr":140185423577088,"size":1073741824,"offset":0,"page_size":4096,"page_size_kib":4096}]`))
	f.Add([]byte(`[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096}]`))
	f.Add([]byte(`[{"base_host_virt_addr":2097152,"size":4194304,"offset":0,"page_size":2097152},{"base_host_virt_addr":16777216,"size":2097152,"offset":4194304,"page_size":2097152}]`))
	f.Add([]byte(`[]`))
	f.Add([]byte(`{`))
	f.Add([]byte(`[{"size":-1}]`))
	f.Fuzz(func(t *testing.T, payload []byte) {
		regions, err := ParseHandshake(payload)
		if err != nil {
			return
		}
		for i, r := range regions {
			if r.PageSize != PageSize && r.PageSize != HugePageSize {
				t.Fatalf("region %d accepted with page size %d", i, r.PageSize)
			}
			if r.Size == 0 || r.Size%r.PageSize != 0 || r.BaseHostVirtAddr%r.PageSize != 0 || r.Offset%r.PageSize != 0 {
				t.Fatalf("region %d accepted unaligned: %+v", i, r)
			}
			if r.BaseHostVirtAddr+r.Size < r.BaseHostVirtAddr {
				t.Fatalf("region %d accepted wrapping: %+v", i, r)
			}
		}
		// What we accept, we can send, and it parses back the same.
		b, err := json.Marshal(regions)
		if err != nil {
			t.Fatal(err)
		}
		again, err := ParseHandshake(b)
		if err != nil || len(again) != len(regions) {
			t.Fatalf("re-parse of accepted %s: %v", b, err)
		}
		for i := range again {
			if again[i] != regions[i] {
				t.Fatalf("re-parse region %d = %+v, want %+v", i, again[i], regions[i])
			}
		}
	})
}

// socketPair returns two connected *net.UnixConn (SOCK_STREAM, as
// Firecracker's handshake socket).
func socketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

func TestHandshakeRoundTripPassesDescriptor(t *testing.T) {
	a, b := socketPair(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	regions := []Region{{BaseHostVirtAddr: 1 << 30, Size: 16 << 20, PageSize: PageSize, PageSizeKiB: PageSize}}
	if err := SendHandshake(a, regions, int(w.Fd())); err != nil {
		t.Fatal(err)
	}
	got, fds, err := ReceiveHandshake(b, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(fds) != 1 {
		t.Fatalf("received %d fds, want 1", len(fds))
	}
	defer unix.Close(fds[0])
	if len(got) != 1 || got[0] != regions[0] {
		t.Fatalf("regions = %+v, want %+v", got, regions)
	}
	// The received descriptor is the pipe's write end.
	if _, err := unix.Write(fds[0], []byte("x")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	if _, err := r.Read(buf); err != nil || buf[0] != 'x' {
		t.Fatalf("read through passed fd: %q, %v", buf, err)
	}
}

func TestHandshakeSendsCompactFirecrackerJSON(t *testing.T) {
	a, b := socketPair(t)
	regions := []Region{{BaseHostVirtAddr: 140185423577088, Size: 1 << 30, PageSize: 4096, PageSizeKiB: 4096}}
	if err := SendHandshake(a, regions, 0); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	oob := make([]byte, 64)
	n, oobn, _, _, err := b.ReadMsgUnix(buf, oob)
	if err != nil {
		t.Fatal(err)
	}
	fds, _ := parseRights(oob[:oobn])
	for _, fd := range fds {
		unix.Close(fd)
	}
	want := `[{"base_host_virt_addr":140185423577088,"size":1073741824,"offset":0,"page_size":4096,"page_size_kib":4096}]`
	if string(buf[:n]) != want {
		t.Fatalf("payload %s, want %s", buf[:n], want)
	}
}

func TestReceiveHandshakeRejectsBadMessages(t *testing.T) {
	good := []byte(`[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]`)
	tests := []struct {
		name    string
		send    func(t *testing.T, c *net.UnixConn)
		wantErr string
	}{
		{"no descriptor", func(t *testing.T, c *net.UnixConn) { c.Write(good) }, "carried no descriptor"},
		{"closed before sending", func(t *testing.T, c *net.UnixConn) { c.Close() }, "EOF"},
		{"three descriptors", func(t *testing.T, c *net.UnixConn) {
			c.WriteMsgUnix(good, unix.UnixRights(0, 1, 2), nil)
		}, "3 descriptors"},
		{"bad json with descriptor", func(t *testing.T, c *net.UnixConn) {
			c.WriteMsgUnix([]byte(`[{`), unix.UnixRights(0), nil)
		}, "parse uffd handshake"},
		{"silence until timeout", func(t *testing.T, c *net.UnixConn) {}, "i/o timeout"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := countFDs(t)
			a, b := socketPair(t)
			tt.send(t, a)
			regions, fds, err := ReceiveHandshake(b, 200*time.Millisecond)
			if err == nil {
				t.Fatalf("ReceiveHandshake = %+v %v, want error containing %q", regions, fds, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %q, want it to contain %q", err, tt.wantErr)
			}
			a.Close()
			b.Close()
			if after := countFDs(t); after != before {
				t.Fatalf("open fds %d before, %d after: received descriptors leaked", before, after)
			}
		})
	}
}

func TestReceiveHandshakeAcceptsTwoDescriptors(t *testing.T) {
	a, b := socketPair(t)
	good := []byte(`[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]`)
	if _, _, err := a.WriteMsgUnix(good, unix.UnixRights(0, 1), nil); err != nil {
		t.Fatal(err)
	}
	_, fds, err := ReceiveHandshake(b, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(fds) != 2 {
		t.Fatalf("got %d fds, want 2", len(fds))
	}
	for _, fd := range fds {
		unix.Close(fd)
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
