package uffd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrClosed is returned by every operation on an FD after Close.
var ErrClosed = errors.New("userfaultfd: use of closed fd")

// FD is a userfaultfd. All methods are safe for concurrent use.
type FD struct {
	// mu guards fd and file against Close: ioctls and reads hold it shared,
	// Close holds it exclusively. Without it a Copy racing a Close could hit
	// a descriptor number the process has already reused for another file.
	mu sync.RWMutex
	fd int // -1 once closed; guarded by mu

	// file is the netpoller registration WaitReadable uses, created on the
	// first wait (after UFFDIO_API: before it, poll reports EPOLLERR, which
	// the runtime would remember). Once set it owns fd; guarded by mu.
	file *os.File
}

// Open creates a userfaultfd with flags (pass unix.O_CLOEXEC|unix.O_NONBLOCK,
// as Firecracker does). It uses /dev/userfaultfd's USERFAULTFD_IOC_NEW when the
// device opens and falls back to the userfaultfd(2) syscall.
func Open(flags int) (*FD, error) {
	if dev, err := unix.Open(devicePath, unix.O_RDWR|unix.O_CLOEXEC, 0); err == nil {
		fd, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(dev), ioctlNew, uintptr(flags))
		unix.Close(dev)
		if errno == 0 {
			return FromFD(int(fd)), nil
		}
	}
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(flags), 0, 0)
	if errno != 0 {
		return nil, fmt.Errorf("open userfaultfd: %w", errno)
	}
	return FromFD(int(fd)), nil
}

// FromFD wraps fd (for example one received over SCM_RIGHTS). The FD owns it
// from now on: Close closes it.
func FromFD(fd int) *FD {
	return &FD{fd: fd}
}

// Fd returns the descriptor number, or -1 after Close. The number is only
// meaningful while the FD is open (e.g. to pass it in a handshake).
func (f *FD) Fd() int {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.fd
}

// ioctl runs one ioctl on the open descriptor, holding mu shared.
func (f *FD) ioctl(req uintptr, arg unsafe.Pointer) error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.fd < 0 {
		return ErrClosed
	}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(f.fd), req, uintptr(arg))
	if errno != 0 {
		return errno
	}
	return nil
}

type uffdioAPI struct{ API, Features, Ioctls uint64 }

type uffdioRange struct{ Start, Len uint64 }

type uffdioRegister struct {
	Range  uffdioRange
	Mode   uint64
	Ioctls uint64
}

type uffdioCopy struct {
	Dst, Src, Len, Mode uint64
	Copy                int64
}

type uffdioZeroPage struct {
	Range    uffdioRange
	Mode     uint64
	ZeroPage int64
}

// API does the UFFDIO_API handshake with the kernel, requesting features.
// It can be done once per userfaultfd (the kernel refuses a second call), so
// a handler never calls it on a uffd it received.
func (f *FD) API(features uint64) error {
	a := uffdioAPI{API: APIVersion, Features: features}
	if err := f.ioctl(ioctlAPI, unsafe.Pointer(&a)); err != nil {
		return fmt.Errorf("UFFDIO_API features=%#x: %w", features, err)
	}
	return nil
}

// Register registers [start, start+length) in mode and returns the mask of
// range ioctls the kernel allows on it (Ioctl* bits).
func (f *FD) Register(start, length uint64, mode uint64) (ioctls uint64, err error) {
	r := uffdioRegister{Range: uffdioRange{start, length}, Mode: mode}
	if err := f.ioctl(ioctlRegister, unsafe.Pointer(&r)); err != nil {
		return 0, fmt.Errorf("UFFDIO_REGISTER %#x+%d mode=%d: %w", start, length, mode, err)
	}
	return r.Ioctls, nil
}

// Unregister removes [start, start+length) from the userfaultfd; later
// faults there are served by the kernel (zero fill for anonymous memory).
func (f *FD) Unregister(start, length uint64) error {
	r := uffdioRange{start, length}
	if err := f.ioctl(ioctlUnregister, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("UFFDIO_UNREGISTER %#x+%d: %w", start, length, err)
	}
	return nil
}

// Copy atomically installs length bytes from src (an address in this
// process, which must stay valid and unmoved: pinned or mmap'd memory) at
// dst in the registered range, waking the faulting thread unless mode has
// CopyModeDontWake. copied is the number of bytes installed before an error
// (0 when the kernel reports none); the error is the bare errno
// (unix.EEXIST, unix.EAGAIN, unix.ESRCH, ...) so callers can switch on it.
func (f *FD) Copy(dst, src uintptr, length uint64, mode uint64) (copied int64, err error) {
	c := uffdioCopy{Dst: uint64(dst), Src: uint64(src), Len: length, Mode: mode}
	err = f.ioctl(ioctlCopy, unsafe.Pointer(&c))
	// c.Copy is signed: -errno on failure (older kernels may leave it 0).
	return max(c.Copy, 0), err
}

// ZeroPage maps zero pages over [start, start+length) (anonymous, 4 KiB
// pages only). Its results follow Copy's.
func (f *FD) ZeroPage(start, length uint64, mode uint64) (zeroed int64, err error) {
	z := uffdioZeroPage{Range: uffdioRange{start, length}, Mode: mode}
	err = f.ioctl(ioctlZeroPage, unsafe.Pointer(&z))
	return max(z.ZeroPage, 0), err
}

// Wake wakes threads waiting on faults in [start, start+length).
func (f *FD) Wake(start, length uint64) error {
	r := uffdioRange{start, length}
	if err := f.ioctl(ioctlWake, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("UFFDIO_WAKE %#x+%d: %w", start, length, err)
	}
	return nil
}

// maxReadMsgs bounds one read(2); a handler loops until EAGAIN anyway.
const maxReadMsgs = 64

// ReadMsgs reads up to len(buf) (at most 64) pending events without
// blocking. When none is pending it returns (0, unix.EAGAIN); the fd must
// have O_NONBLOCK (Firecracker and Open with O_NONBLOCK set it).
func (f *FD) ReadMsgs(buf []Msg) (n int, err error) {
	var raw [maxReadMsgs * MsgSize]byte
	want := min(len(buf), maxReadMsgs)
	if want == 0 {
		return 0, nil
	}
	f.mu.RLock()
	if f.fd < 0 {
		f.mu.RUnlock()
		return 0, ErrClosed
	}
	nb, err := unix.Read(f.fd, raw[:want*MsgSize])
	f.mu.RUnlock()
	if err != nil {
		if errors.Is(err, unix.EAGAIN) {
			return 0, unix.EAGAIN
		}
		return 0, fmt.Errorf("read userfaultfd: %w", err)
	}
	if nb%MsgSize != 0 {
		return 0, fmt.Errorf("read userfaultfd: %d bytes is not a whole number of %d-byte messages", nb, MsgSize)
	}
	for i := 0; i < nb/MsgSize; i++ {
		m, err := DecodeMsg(raw[i*MsgSize : (i+1)*MsgSize])
		if err != nil {
			return i, err
		}
		buf[i] = m
	}
	return nb / MsgSize, nil
}

// WaitReadable blocks until the userfaultfd may have events, ctx ends, or
// the FD is closed. It parks the goroutine on the Go netpoller (no OS thread
// is held). Wakeups can be spurious: callers read until EAGAIN and wait
// again. It must be called only after UFFDIO_API has been done on the fd.
func (f *FD) WaitReadable(ctx context.Context) error {
	file, err := f.pollFile()
	if err != nil {
		return err
	}
	if err := file.SetReadDeadline(time.Time{}); err != nil {
		return fmt.Errorf("wait userfaultfd: %w", err)
	}
	// Cancellation sets a past deadline. If that func has started, wait for
	// it: left running, it could land on the next wait and fail it.
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(fired)
		file.SetReadDeadline(time.Unix(1, 0))
	})
	defer func() {
		if !stop() {
			<-fired
		}
	}()
	rc, err := file.SyscallConn()
	if err != nil {
		return fmt.Errorf("wait userfaultfd: %w", err)
	}
	// rawConn.Read first clears the netpoller's readiness token, then calls
	// the function; while it returns false, it parks until the next edge
	// and calls it again. So the function must check the level itself: a
	// zero-timeout poll(2). Returning on the bare token would lose an event
	// that arrived between the caller's last EAGAIN and this wait (the reset
	// drops its edge) and hang the faulting thread forever.
	err = rc.Read(func(fd uintptr) bool {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, 0)
		return err == nil && n > 0 && pfd[0].Revents&(unix.POLLIN|unix.POLLERR) != 0
	})
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil:
		return ctx.Err()
	case f.Fd() < 0:
		return ErrClosed
	case errors.Is(err, os.ErrDeadlineExceeded):
		return nil // a stale deadline: report a (spurious) wakeup
	default:
		return fmt.Errorf("wait userfaultfd: %w", err)
	}
}

// pollFile returns the netpoller-registered file for fd, creating it once.
func (f *FD) pollFile() (*os.File, error) {
	f.mu.RLock()
	file, fd := f.file, f.fd
	f.mu.RUnlock()
	if file != nil {
		return file, nil
	}
	if fd < 0 {
		return nil, ErrClosed
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fd < 0 {
		return nil, ErrClosed
	}
	if f.file == nil {
		// The netpoller needs O_NONBLOCK; the flag lives on the open file
		// description the sender shares, and Firecracker sets it anyway.
		if err := unix.SetNonblock(f.fd, true); err != nil {
			return nil, fmt.Errorf("wait userfaultfd: set nonblock: %w", err)
		}
		f.file = os.NewFile(uintptr(f.fd), "userfaultfd")
	}
	return f.file, nil
}

// Close closes the userfaultfd. It waits for in-flight ioctls, wakes any
// WaitReadable, and makes every later call return ErrClosed. Closing twice
// returns ErrClosed.
func (f *FD) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fd < 0 {
		return ErrClosed
	}
	fd, file := f.fd, f.file
	f.fd, f.file = -1, nil
	if file != nil {
		// The os.File defers the close(2) until a concurrent wait returns.
		return file.Close()
	}
	if err := unix.Close(fd); err != nil {
		return fmt.Errorf("close userfaultfd: %w", err)
	}
	return nil
}
