package uffd

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// Region is one entry of Firecracker's handshake (GuestRegionUffdMapping):
// guest memory at BaseHostVirtAddr in the VMM, Size bytes, backed by the
// mem-file at Offset. PageSizeKiB holds bytes despite its name (Firecracker
// ≤ 1.11 sends only it; later versions send both).
type Region struct {
	BaseHostVirtAddr uint64 `json:"base_host_virt_addr"`
	Size             uint64 `json:"size"`
	Offset           uint64 `json:"offset"`
	PageSize         uint64 `json:"page_size,omitempty"` // not sent by Firecracker < 1.12
	PageSizeKiB      uint64 `json:"page_size_kib"`
}

// MaxHandshakeFDs is how many descriptors a handshake may carry: the uffd,
// plus a guest-memory memfd from e2b-style senders.
const MaxHandshakeFDs = 2

// handshakeBufSize bounds the JSON payload: ~130 bytes a region, so room
// for a hundred regions (Firecracker sends 1-3, more with hotplug).
const handshakeBufSize = 16 << 10

// SendHandshake sends regions and fd as Firecracker does: one sendmsg whose
// payload is the compact JSON array and whose SCM_RIGHTS carries fd. The
// connection stays open (Firecracker ≥ 1.12 never closes it).
func SendHandshake(conn *net.UnixConn, regions []Region, fd int) error {
	payload, err := json.Marshal(regions)
	if err != nil {
		return fmt.Errorf("send uffd handshake: %w", err)
	}
	n, oobn, err := conn.WriteMsgUnix(payload, unix.UnixRights(fd), nil)
	if err != nil {
		return fmt.Errorf("send uffd handshake to %s: %w", conn.RemoteAddr(), err)
	}
	if n != len(payload) || oobn == 0 {
		return fmt.Errorf("send uffd handshake: short write %d/%d bytes, %d oob", n, len(payload), oobn)
	}
	return nil
}

// ReceiveHandshake reads one handshake message from conn within timeout and
// returns the validated regions and the 1-2 received descriptors (the uffd
// first), which the caller owns. On any error every received descriptor is
// closed.
func ReceiveHandshake(conn *net.UnixConn, timeout time.Duration) ([]Region, []int, error) {
	if err := conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, nil, fmt.Errorf("receive uffd handshake: %w", err)
	}
	defer conn.SetReadDeadline(time.Time{})
	buf := make([]byte, handshakeBufSize)
	// Room for more descriptors than we accept, so extras are received (and
	// closed) instead of truncated away unseen.
	oob := make([]byte, unix.CmsgSpace(8*4))
	n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
	fds, ferr := parseRights(oob[:oobn])
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	if err != nil {
		closeAll()
		return nil, nil, fmt.Errorf("receive uffd handshake: %w", err)
	}
	if ferr != nil {
		closeAll()
		return nil, nil, fmt.Errorf("receive uffd handshake: %w", ferr)
	}
	if flags&unix.MSG_CTRUNC != 0 {
		closeAll()
		return nil, nil, errors.New("receive uffd handshake: control data truncated (too many descriptors)")
	}
	if len(fds) == 0 {
		closeAll()
		if n == 0 {
			return nil, nil, errors.New("receive uffd handshake: connection closed before the handshake")
		}
		return nil, nil, fmt.Errorf("receive uffd handshake: %d-byte payload carried no descriptor", n)
	}
	if len(fds) > MaxHandshakeFDs {
		closeAll()
		return nil, nil, fmt.Errorf("receive uffd handshake: %d descriptors, want 1 or %d", len(fds), MaxHandshakeFDs)
	}
	regions, err := ParseHandshake(buf[:n])
	if err != nil {
		closeAll()
		return nil, nil, fmt.Errorf("receive uffd handshake: %w", err)
	}
	return regions, fds, nil
}

func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parse control message: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			return fds, fmt.Errorf("parse SCM_RIGHTS: %w", err)
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

// ParseHandshake decodes and validates a handshake payload. It accepts
// page_size, page_size_kib (bytes) or both (then they must agree), and
// returns regions with PageSize set. Every region must be non-empty,
// page-aligned in address, size and offset, use the same page size
// (4 KiB or 2 MiB), and not wrap the address space; regions must not
// overlap in memory or in the file.
func ParseHandshake(payload []byte) ([]Region, error) {
	var regions []Region
	if err := json.Unmarshal(payload, &regions); err != nil {
		return nil, fmt.Errorf("parse uffd handshake: %w", err)
	}
	if len(regions) == 0 {
		return nil, errors.New("parse uffd handshake: no regions")
	}
	for i := range regions {
		r := &regions[i]
		switch {
		case r.PageSize == 0 && r.PageSizeKiB == 0:
			return nil, fmt.Errorf("parse uffd handshake: region %d has no page size", i)
		case r.PageSize == 0:
			r.PageSize = r.PageSizeKiB
		case r.PageSizeKiB != 0 && r.PageSizeKiB != r.PageSize:
			return nil, fmt.Errorf("parse uffd handshake: region %d: page_size %d disagrees with page_size_kib %d", i, r.PageSize, r.PageSizeKiB)
		}
		if r.PageSize != PageSize && r.PageSize != HugePageSize {
			return nil, fmt.Errorf("parse uffd handshake: region %d: page size %d, want %d or %d", i, r.PageSize, PageSize, HugePageSize)
		}
		if r.PageSize != regions[0].PageSize {
			return nil, fmt.Errorf("parse uffd handshake: region %d: page size %d differs from region 0's %d", i, r.PageSize, regions[0].PageSize)
		}
		mask := r.PageSize - 1
		if r.Size == 0 || r.Size&mask != 0 || r.BaseHostVirtAddr&mask != 0 || r.Offset&mask != 0 {
			return nil, fmt.Errorf("parse uffd handshake: region %d (addr %#x size %d offset %d) is empty or not aligned to %d", i, r.BaseHostVirtAddr, r.Size, r.Offset, r.PageSize)
		}
		if r.BaseHostVirtAddr+r.Size < r.BaseHostVirtAddr || r.Offset+r.Size < r.Offset {
			return nil, fmt.Errorf("parse uffd handshake: region %d overflows", i)
		}
		for j := range i {
			o := regions[j]
			if overlaps(r.BaseHostVirtAddr, r.Size, o.BaseHostVirtAddr, o.Size) {
				return nil, fmt.Errorf("parse uffd handshake: regions %d and %d overlap in memory", j, i)
			}
			if overlaps(r.Offset, r.Size, o.Offset, o.Size) {
				return nil, fmt.Errorf("parse uffd handshake: regions %d and %d overlap in the file", j, i)
			}
		}
	}
	return regions, nil
}

func overlaps(a, alen, b, blen uint64) bool {
	return a < b+blen && b < a+alen
}
