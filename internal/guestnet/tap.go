package guestnet

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// vnetHdrLen is the size of the virtio_net_hdr_v1 that prefixes every frame
// on a TAP opened with IFF_VNET_HDR, as Firecracker sets it
// (TUNSETVNETHDRSZ 12).
const vnetHdrLen = 12

// maxFrame bounds one read from the TAP: Firecracker's MAX_BUFFER_SIZE
// (65562) covers the vnet header and the largest frame.
const maxFrame = 65562

// TAP is a TAP device opened by name, the host side of one guest NIC. It
// stays open (carrier up, frames queued for the guest) until Close.
type TAP struct {
	name string
	f    *os.File // non-blocking, so reads park in the netpoller, not a thread
}

// OpenTAP opens the TAP called name in the calling thread's network
// namespace, as Firecracker's Tap::open_named does: /dev/net/tun with
// O_RDWR|O_NONBLOCK|O_CLOEXEC, TUNSETIFF with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR,
// TUNSETVNETHDRSZ 12. So the device is left in the state a real Firecracker
// leaves it, and an attach fails where Firecracker's would: EBUSY for a TAP
// another process holds, EINVAL for a multi-queue TAP or a device that is
// not a TAP. The offloads are then set to none (TUNSETOFFLOAD 0), what
// Firecracker sets for a guest driver that negotiates no offload: the
// kernel hands over whole, checksummed frames.
//
// Unlike a privileged Firecracker it never creates the device: a name that
// does not exist is refused (ENODEV) before TUNSETIFF, and a device that
// TUNSETIFF nevertheless created (it vanished in between) is closed again,
// which destroys it. The errors read as Firecracker's TapError.
func OpenTAP(name string) (*TAP, error) {
	if name == "" || len(name) >= unix.IFNAMSIZ || strings.ContainsRune(name, 0) {
		return nil, errInvalidIfname
	}
	ifreqErr := func(err error) error {
		return tapErrorf("Error while creating ifreq structure: %s. Invalid TUN/TAP Backend provided by %s. Check our documentation on setting up the network devices.", osError(err), name)
	}
	if _, err := net.InterfaceByName(name); err != nil {
		return nil, ifreqErr(unix.ENODEV)
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, tapErrorf("Couldn't open /dev/net/tun: %s", osError(err))
	}
	fail := func(err error) (*TAP, error) {
		unix.Close(fd)
		return nil, err
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fail(errInvalidIfname)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return fail(ifreqErr(err))
	}
	// TUNSETIFF creates a missing device when the caller may (CAP_NET_ADMIN).
	// The one a manager made is persistent; one without IFF_PERSIST was just
	// made by this call, and closing the fd removes it again.
	if err := unix.IoctlIfreq(fd, unix.TUNGETIFF, ifr); err != nil {
		return fail(ifreqErr(err))
	}
	if ifr.Uint16()&unix.IFF_PERSIST == 0 {
		return fail(ifreqErr(unix.ENODEV))
	}
	if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, vnetHdrLen); err != nil {
		return fail(tapErrorf("Setting vnet header size failed: Error while setting size of the vnet header: %s", osError(err)))
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, 0); err != nil {
		return fail(tapErrorf("Error while setting the offload flags: %s", osError(err)))
	}
	return &TAP{name: name, f: os.NewFile(uintptr(fd), "/dev/net/tun:"+name)}, nil
}

// Name is the device name the TAP was opened by.
func (t *TAP) Name() string { return t.name }

// Close detaches from the device (its carrier goes down; the persistent
// device itself stays).
func (t *TAP) Close() error { return t.f.Close() }

// TapError is an OpenTAP failure, worded as Firecracker's TapError so a
// fault message reads as the real VMM's.
type TapError string

func (e TapError) Error() string { return string(e) }

func tapErrorf(format string, args ...any) error { return TapError(fmt.Sprintf(format, args...)) }

const errInvalidIfname TapError = "Invalid interface name"

// osError formats an errno as Rust's io::Error does ("No such device (os
// error 19)"), so fault messages read as Firecracker's.
func osError(err error) string {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return err.Error()
	}
	s := errno.Error()
	if s != "" {
		s = strings.ToUpper(s[:1]) + s[1:]
	}
	return fmt.Sprintf("%s (os error %d)", s, int(errno))
}
