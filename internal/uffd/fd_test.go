package uffd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/forkd/forkd/internal/testenv"
	"golang.org/x/sys/unix"
)

// waitParkedIn waits until a goroutine is parked in the netpoller ([IO
// wait]) inside function fn: the wait under test has begun.
func waitParkedIn(t *testing.T, fn string) {
	t.Helper()
	buf := make([]byte, 1<<20)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Millisecond) {
		for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
			if strings.Contains(g, "[IO wait") && strings.Contains(g, fn) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no goroutine parked in %s after 30 s", fn)
		}
	}
}

// openOrSkip opens a userfaultfd with Firecracker's flags and API(features);
// where the kernel or permissions do not allow it the test skips, or fails
// under FORKD_TEST_REQUIRE=uffd.
func openOrSkip(t *testing.T, features uint64) *FD {
	t.Helper()
	f, err := Open(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		testenv.Need(t, testenv.Uffd, fmt.Sprintf("userfaultfd unavailable (need root or /dev/userfaultfd access): %v", err))
	}
	if err := f.API(features); err != nil {
		f.Close()
		t.Fatalf("API: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func mmapAnon(t *testing.T, size int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

func addr(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }

// touch reads one byte of each listed page on a locked OS thread (the thread
// blocks in the kernel until the page is served) and returns the bytes.
func touch(mem []byte, pages []int) <-chan []byte {
	out := make(chan []byte, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		got := make([]byte, len(pages))
		for i, p := range pages {
			got[i] = mem[p*PageSize+p%PageSize]
		}
		out <- got
	}()
	return out
}

// serve handles page faults on f from src until ctx ends, zero-filling
// removed ranges, and counts what it did.
func serve(ctx context.Context, f *FD, base uint64, src []byte) (faults, removes int, err error) {
	msgs := make([]Msg, 16)
	for {
		n, err := f.ReadMsgs(msgs)
		if errors.Is(err, unix.EAGAIN) {
			if err := f.WaitReadable(ctx); err != nil {
				return faults, removes, err
			}
			continue
		}
		if err != nil {
			return faults, removes, err
		}
		for _, m := range msgs[:n] {
			switch m.Event {
			case EventPagefault:
				faults++
				page := m.Address &^ (PageSize - 1)
				off := page - base
				_, err := f.Copy(uintptr(page), uintptr(unsafe.Pointer(&src[off])), PageSize, 0)
				if err != nil && !errors.Is(err, unix.EEXIST) {
					return faults, removes, err
				}
			case EventRemove:
				removes++
			}
		}
	}
}

func TestCopyServesFaultsInProcess(t *testing.T) {
	f := openOrSkip(t, FeatureEventRemove)
	const pages = 64
	mem := mmapAnon(t, pages*PageSize)
	src := mmapAnon(t, pages*PageSize) // not Go heap: Copy's source must not move
	for i := range src {
		src[i] = byte(i*7 + i/PageSize)
	}
	ioctls, err := f.Register(addr(mem), uint64(len(mem)), RegisterModeMissing)
	if err != nil {
		t.Fatal(err)
	}
	if ioctls&IoctlCopy == 0 || ioctls&IoctlZeroPage == 0 || ioctls&IoctlWake == 0 {
		t.Fatalf("register ioctls %#x lack COPY|ZEROPAGE|WAKE", ioctls)
	}
	ctx, cancel := context.WithCancel(context.Background())
	type result struct {
		faults, removes int
		err             error
	}
	done := make(chan result, 1)
	go func() {
		// The handler on its own locked OS thread, as the toucher is.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		fa, re, err := serve(ctx, f, addr(mem), src)
		done <- result{fa, re, err}
	}()
	order := []int{5, 0, 63, 17, 5, 42, 1}
	var got []byte
	select {
	case got = <-touch(mem, order):
	case <-time.After(30 * time.Second):
		t.Fatal("touching registered pages did not finish: faults not served")
	}
	for i, p := range order {
		if want := src[p*PageSize+p%PageSize]; got[i] != want {
			t.Errorf("page %d byte = %#x, want %#x", p, got[i], want)
		}
	}
	// MADV_DONTNEED on registered anonymous memory queues a REMOVE event,
	// and the page faults again afterwards.
	if err := unix.Madvise(mem[5*PageSize:6*PageSize], unix.MADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	<-touch(mem, []int{5})
	cancel()
	r := <-done
	if !errors.Is(r.err, context.Canceled) {
		t.Fatalf("serve ended with %v, want context.Canceled", r.err)
	}
	if r.faults != 7 || r.removes != 1 {
		t.Fatalf("served %d faults and %d removes, want 7 (6 distinct pages + 1 after DONTNEED) and 1", r.faults, r.removes)
	}
}

func TestZeroPageAndWake(t *testing.T) {
	f := openOrSkip(t, 0)
	mem := mmapAnon(t, 4*PageSize)
	if _, err := f.Register(addr(mem), uint64(len(mem)), RegisterModeMissing); err != nil {
		t.Fatal(err)
	}
	// Pre-populate page 0 without a waiter, then a second zeropage of the
	// same page reports EEXIST: the rule handlers treat as success.
	n, err := f.ZeroPage(addr(mem), PageSize, ZeroPageModeDontWake)
	if err != nil || n != PageSize {
		t.Fatalf("ZeroPage = %d, %v, want %d, nil", n, err, PageSize)
	}
	if _, err := f.ZeroPage(addr(mem), PageSize, 0); !errors.Is(err, unix.EEXIST) {
		t.Fatalf("second ZeroPage err = %v, want EEXIST", err)
	}
	src := mmapAnon(t, PageSize)
	src[0] = 0xAB
	if _, err := f.Copy(uintptr(addr(mem)), uintptr(addr(src)), PageSize, 0); !errors.Is(err, unix.EEXIST) {
		t.Fatalf("Copy over populated page err = %v, want EEXIST", err)
	}
	if err := f.Wake(addr(mem), PageSize); err != nil {
		t.Fatal(err)
	}
	if mem[0] != 0 {
		t.Fatalf("zero page reads %#x", mem[0])
	}
	if err := f.Unregister(addr(mem), uint64(len(mem))); err != nil {
		t.Fatal(err)
	}
	// Unregistered: the kernel zero-fills without asking us.
	if mem[3*PageSize] != 0 {
		t.Fatal("unregistered page not zero")
	}
}

func TestClosedFDRefusesEveryOperation(t *testing.T) {
	f := openOrSkip(t, 0)
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	ops := map[string]func() error{
		"API":          func() error { return f.API(0) },
		"Register":     func() error { _, err := f.Register(0x10000, PageSize, RegisterModeMissing); return err },
		"Unregister":   func() error { return f.Unregister(0x10000, PageSize) },
		"Copy":         func() error { _, err := f.Copy(0x10000, 0x20000, PageSize, 0); return err },
		"ZeroPage":     func() error { _, err := f.ZeroPage(0x10000, PageSize, 0); return err },
		"Wake":         func() error { return f.Wake(0x10000, PageSize) },
		"ReadMsgs":     func() error { _, err := f.ReadMsgs(make([]Msg, 1)); return err },
		"WaitReadable": func() error { return f.WaitReadable(context.Background()) },
		"Close":        func() error { return f.Close() },
	}
	for name, op := range ops {
		if err := op(); !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close: err = %v, want ErrClosed", name, err)
		}
	}
	if f.Fd() != -1 {
		t.Errorf("Fd after Close = %d, want -1", f.Fd())
	}
}

// TestClosedFDNumberIsRecycled is the twin of the closed-fd guard: it shows
// the hazard the guard prevents. After Close the same number names another
// file, and a raw ioctl on it reaches that file.
func TestClosedFDNumberIsRecycled(t *testing.T) {
	f := openOrSkip(t, 0)
	num := f.Fd()
	f.Close()
	// Put /dev/null on exactly the closed number, as a concurrent open in
	// another goroutine could at any time (letting the kernel pick the
	// lowest free number races with the runtime's own fds under -race).
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	if err := unix.Dup3(int(devnull.Fd()), num, unix.O_CLOEXEC); err != nil {
		t.Fatalf("dup /dev/null onto fd %d: %v", num, err)
	}
	defer unix.Close(num)
	r := uffdioRange{0x10000, PageSize}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(num), ioctlWake, uintptr(unsafe.Pointer(&r)))
	if errno != unix.ENOTTY {
		t.Fatalf("raw ioctl on recycled fd: errno %v, want ENOTTY from /dev/null", errno)
	}
	if err := f.Wake(0x10000, PageSize); !errors.Is(err, ErrClosed) {
		t.Fatalf("guarded Wake on recycled number: %v, want ErrClosed", err)
	}
}

func TestCloseWakesWaitReadable(t *testing.T) {
	f := openOrSkip(t, 0)
	done := make(chan error, 1)
	go func() { done <- f.WaitReadable(context.Background()) }()
	waitParkedIn(t, "uffd.(*FD).WaitReadable")
	f.Close()
	select {
	case err := <-done:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("WaitReadable after Close: %v, want ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("WaitReadable did not return after Close")
	}
}

func TestReadMsgsEmptyIsEAGAIN(t *testing.T) {
	f := openOrSkip(t, 0)
	n, err := f.ReadMsgs(make([]Msg, 4))
	if n != 0 || !errors.Is(err, unix.EAGAIN) {
		t.Fatalf("ReadMsgs on idle uffd = %d, %v, want 0, EAGAIN", n, err)
	}
}

// TestWaitReadableSeesEventQueuedBeforeTheWait: an event queued while
// nobody waits (its edge already consumed by the netpoller) must still end
// the next wait. A wait that trusted the runtime's readiness token alone
// lost it and hung the thread that queued it.
func TestWaitReadableSeesEventQueuedBeforeTheWait(t *testing.T) {
	f := openOrSkip(t, FeatureEventRemove)
	mem := mmapAnon(t, 4*PageSize)
	if _, err := f.Register(addr(mem), uint64(len(mem)), RegisterModeMissing); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ZeroPage(addr(mem), PageSize, 0); err != nil {
		t.Fatal(err)
	}
	// Register the fd with the netpoller (an expired wait).
	expired, cancel := context.WithCancel(context.Background())
	cancel()
	if err := f.WaitReadable(expired); !errors.Is(err, context.Canceled) {
		t.Fatalf("expired wait: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- unix.Madvise(mem[:PageSize], unix.MADV_DONTNEED) }() // blocks until the REMOVE is read
	// The event is queued (the fd polls readable), so its edge has fired.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Millisecond) {
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(f.Fd()), Events: unix.POLLIN}}, 0)
		if err == nil && n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the REMOVE event never became readable")
		}
	}
	ctx, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	if err := f.WaitReadable(ctx); err != nil {
		t.Fatalf("WaitReadable with a queued REMOVE: %v (lost wakeup)", err)
	}
	msgs := make([]Msg, 4)
	n, err := f.ReadMsgs(msgs)
	if err != nil || n != 1 || msgs[0].Event != EventRemove || msgs[0].Start != addr(mem) || msgs[0].End != addr(mem)+PageSize {
		t.Fatalf("ReadMsgs = %d %+v %v, want one REMOVE of page 0", n, msgs[:n], err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestCopyGetsEAGAINWhileARemoveIsUnread pins down the kernel rule the
// pager's deferred queue exists for: while a REMOVE is queued and unread,
// every COPY fails with EAGAIN (copied 0); once it is read, the same COPY
// succeeds.
func TestCopyGetsEAGAINWhileARemoveIsUnread(t *testing.T) {
	mem := mmapAnon(t, 8*PageSize)
	src := mmapAnon(t, PageSize)
	f := openOrSkip(t, FeatureEventRemove) // closed before the munmaps (cleanups run LIFO)
	src[0] = 0x5A
	if _, err := f.Register(addr(mem), uint64(len(mem)), RegisterModeMissing); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ZeroPage(addr(mem)+4*PageSize, PageSize, 0); err != nil {
		t.Fatal(err)
	}
	got := touch(mem, []int{0}) // blocks in a fault on page 0
	msgs := make([]Msg, 4)
	waitEvent := func(want uint8) Msg {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		for {
			n, err := f.ReadMsgs(msgs[:1])
			if n == 1 {
				if msgs[0].Event == want {
					return msgs[0]
				}
				// A fault interrupted by a signal (Go's preemption) is
				// raised again: skip repeats of the pending one.
				if msgs[0].Event != EventPagefault || msgs[0].Address&^(PageSize-1) != addr(mem) {
					t.Fatalf("event %s, want %#x", msgs[0], want)
				}
				continue
			}
			if !errors.Is(err, unix.EAGAIN) {
				t.Fatal(err)
			}
			if err := f.WaitReadable(ctx); err != nil {
				t.Fatalf("waiting for event %#x: %v", want, err)
			}
		}
	}
	fault := waitEvent(EventPagefault)
	removed := make(chan error, 1)
	go func() { removed <- unix.Madvise(mem[4*PageSize:5*PageSize], unix.MADV_DONTNEED) }()
	// The uffd turns readable once madvise has queued its REMOVE (the
	// fault is already read): from then on COPY fails with EAGAIN.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := f.WaitReadable(ctx); err != nil {
		t.Fatalf("waiting for the REMOVE to be queued: %v", err)
	}
	n, err := f.Copy(uintptr(fault.Address&^(PageSize-1)), uintptr(addr(src)), PageSize, 0)
	if !errors.Is(err, unix.EAGAIN) || n != 0 {
		t.Fatalf("COPY with a REMOVE unread = %d, %v; want 0, EAGAIN", n, err)
	}
	waitEvent(EventRemove)
	// Reading the REMOVE lets madvise continue; the kernel clears its
	// "mmap changing" mark when that thread runs again, so COPY may need a
	// few retries (the pager's deferred queue), never a new event.
	for {
		_, err := f.Copy(uintptr(fault.Address&^(PageSize-1)), uintptr(addr(src)), PageSize, 0)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EAGAIN) || ctx.Err() != nil {
			t.Fatalf("COPY after reading the REMOVE: %v, want success", err)
		}
		time.Sleep(time.Millisecond)
	}
	if b := <-got; b[0] != 0x5A {
		t.Fatalf("faulting thread read %#x, want 0x5a", b[0])
	}
	if err := <-removed; err != nil {
		t.Fatal(err)
	}
}
