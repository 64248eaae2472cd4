package emulator

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/testenv"
	"github.com/forkd/forkd/internal/uffd"
)

// testPager is a minimal userfaultfd handler for one VMM: it serves missing
// pages from a mem-file and zero-fills ranges the guest removed, in pages of
// the size the handshake announces for the region (so a hugetlbfs guest
// whose handshake said 4 KiB fails its copies). With ignoreRemove it reads
// REMOVE events but forgets them, so it resurrects file data into removed
// ranges: the bug the workload must catch.
type testPager struct {
	t            *testing.T
	backing      []byte
	ignoreRemove bool

	faults, removes atomic.Int64

	mu      sync.Mutex
	regions []uffd.Region // as parsed (PageSize filled from page_size_kib if absent)
	raw     []byte        // the handshake's JSON payload as sent
	err     error
	removed [][2]uint64 // [start, end) ranges to zero-fill
}

func startTestPager(t *testing.T, sock, memPath string, ignoreRemove bool) *testPager {
	t.Helper()
	f, err := os.Open(memPath)
	if err != nil {
		t.Fatal(err)
	}
	st, _ := f.Stat()
	backing, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	p := &testPager{t: t, backing: backing, ignoreRemove: ignoreRemove}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := p.serve(ctx, ln); err != nil && ctx.Err() == nil {
			t.Logf("test pager stopped: %v", err)
			p.mu.Lock()
			p.err = err
			p.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		cancel()
		ln.Close()
		<-done
		unix.Munmap(backing)
	})
	return p
}

func (p *testPager) serve(ctx context.Context, ln *net.UnixListener) error {
	ln.SetDeadline(time.Now().Add(30 * time.Second))
	conn, err := ln.AcceptUnix()
	if err != nil {
		return fmt.Errorf("accept: %w", err)
	}
	defer conn.Close()
	raw, fdn, err := receiveRawHandshake(conn)
	if err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	fd := uffd.FromFD(fdn)
	defer fd.Close()
	regions, err := uffd.ParseHandshake(raw)
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.regions, p.raw = regions, raw
	p.mu.Unlock()

	msgs := make([]uffd.Msg, 64)
	var pending []uint64 // faults not yet served (EAGAIN: an event is queued)
	for {
		// With faults pending after EAGAIN, wait briefly: the event that
		// caused it may already have been read.
		wctx, cancel := ctx, context.CancelFunc(func() {})
		if len(pending) > 0 {
			wctx, cancel = context.WithTimeout(ctx, time.Millisecond)
		}
		err := fd.WaitReadable(wctx)
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		for {
			n, err := fd.ReadMsgs(msgs)
			if errors.Is(err, unix.EAGAIN) {
				break
			}
			if err != nil {
				return fmt.Errorf("read events: %w", err)
			}
			// Apply REMOVEs before serving faults read in the same batch.
			for _, m := range msgs[:n] {
				if m.Event == uffd.EventRemove {
					p.removes.Add(1)
					if !p.ignoreRemove {
						p.removed = append(p.removed, [2]uint64{m.Start, m.End})
					}
				}
			}
			for _, m := range msgs[:n] {
				if m.Event == uffd.EventPagefault {
					pending = append(pending, m.Address)
				}
			}
		}
		var again []uint64
		for _, addr := range pending {
			retry, err := p.serveFault(fd, addr)
			if err != nil {
				return err
			}
			if retry {
				again = append(again, addr)
			}
		}
		pending = again
	}
}

// receiveRawHandshake reads the VMM's one handshake message: its payload
// as sent (so a test sees which fields the release sent) and its one
// descriptor.
func receiveRawHandshake(conn *net.UnixConn) ([]byte, int, error) {
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf, oob := make([]byte, 16<<10), make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, -1, err
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return nil, -1, fmt.Errorf("control messages %d: %v", len(msgs), err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return nil, -1, fmt.Errorf("descriptors %v: %v", fds, err)
	}
	return buf[:n], fds[0], nil
}

func (p *testPager) serveFault(fd *uffd.FD, fault uint64) (retry bool, err error) {
	p.faults.Add(1)
	for _, r := range p.regions {
		if fault < r.BaseHostVirtAddr || fault >= r.BaseHostVirtAddr+r.Size {
			continue
		}
		ps := r.PageSize // ParseHandshake fills it from page_size_kib before 1.12
		addr := fault &^ (ps - 1)
		for _, rm := range p.removed {
			if addr >= rm[0] && addr < rm[1] {
				if ps == pageSize {
					_, err = fd.ZeroPage(addr, ps, 0)
				} else { // hugetlbfs has no ZEROPAGE
					_, err = fd.Copy(uintptr(addr), uintptr(unsafe.Pointer(&make([]byte, ps)[0])), ps, 0)
				}
				return p.result(addr, err)
			}
		}
		off := r.Offset + addr - r.BaseHostVirtAddr
		_, err = fd.Copy(uintptr(addr), uintptr(unsafe.Pointer(&p.backing[off])), ps, 0)
		return p.result(addr, err)
	}
	return false, fmt.Errorf("fault at %#x outside every region", fault)
}

func (p *testPager) result(addr uint64, err error) (bool, error) {
	switch {
	case err == nil, errors.Is(err, unix.EEXIST), errors.Is(err, unix.ESRCH):
		return false, nil
	case errors.Is(err, unix.EAGAIN):
		return true, nil
	}
	return false, fmt.Errorf("serve fault at %#x: %w", addr, err)
}

func (p *testPager) check(t *testing.T) []uffd.Region {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err != nil {
		t.Fatalf("test pager: %v", p.err)
	}
	return p.regions
}

func requireUffd(t testing.TB) {
	t.Helper()
	f, err := uffd.Open(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		testenv.Need(t, testenv.Uffd, fmt.Sprintf("userfaultfd unavailable here (%v); the Uffd load path is untested", err))
	}
	f.Close()
}

func (p *vmmProc) loadUffd(vmstate, sock string) {
	p.t.Helper()
	p.must("PUT", "/snapshot/load", map[string]any{"snapshot_path": vmstate,
		"mem_backend": map[string]any{"backend_type": "Uffd", "backend_path": sock}, "resume_vm": true}, 204)
}

// uffdBootArgs: a large share of free pages is scratch in the snapshot, so
// discards after the restore remove pages whose file data is not zero.
const uffdBootArgs = "forkd.ws_mib=20 forkd.split_mib=16 forkd.rate=20000 forkd.write_pct=30 forkd.discard_pct=30"

func TestUffdLoadRunsCleanWithAHandlerThatHonoursRemove(t *testing.T) {
	requireUffd(t)
	dir := t.TempDir()
	_, vmstate, mem := bootedSnapshot(t, dir, bootSpec{vcpus: 2, memMib: 32, bootArgs: uffdBootArgs}, 6000)
	sock := filepath.Join(dir, "uffd.sock")
	pager := startTestPager(t, sock, mem, false)
	p := startVMM(t, dir)
	p.loadUffd(vmstate, sock)
	st := p.waitTicks(4000)
	requireClean(t, "uffd restore", st)
	regions := pager.check(t)
	if len(regions) != 2 || regions[0].Offset != 0 || regions[1].Offset != 16<<20 ||
		regions[0].Size+regions[1].Size != 32<<20 || regions[0].PageSize != pageSize || regions[0].PageSizeKiB != pageSize {
		t.Fatalf("handshake regions %+v, want two contiguous 16 MiB regions with page_size and page_size_kib 4096", regions)
	}
	if pager.faults.Load() == 0 || pager.removes.Load() == 0 || st.Discards == 0 {
		t.Fatalf("pager saw %d faults and %d removes, guest did %d discards; want all > 0",
			pager.faults.Load(), pager.removes.Load(), st.Discards)
	}

	// A Full snapshot of the lazily restored VM faults in the rest of RAM
	// and restores (as File) to the same guest.
	p.pause()
	vmstate2, mem2 := filepath.Join(dir, "after-uffd.vmstate"), filepath.Join(dir, "after-uffd.mem")
	p.snapshot("Full", vmstate2, mem2)
	pager.check(t)
	q := startVMM(t, dir)
	q.loadFile(vmstate2, mem2, false, true)
	requireClean(t, "File restore of a uffd-restored VM", q.waitTicks(3000))
}

// The twin: a handler that resurrects file data into removed ranges is
// caught by the workload.
func TestUffdHandlerResurrectingRemovedPagesIsDetected(t *testing.T) {
	requireUffd(t)
	dir := t.TempDir()
	_, vmstate, mem := bootedSnapshot(t, dir, bootSpec{vcpus: 2, memMib: 32, bootArgs: uffdBootArgs}, 6000)
	sock := filepath.Join(dir, "uffd.sock")
	pager := startTestPager(t, sock, mem, true)
	p := startVMM(t, dir)
	p.loadUffd(vmstate, sock)
	deadline := time.Now().Add(60 * time.Second)
	for {
		st := p.guest()
		if st.IntegrityErrors > 0 {
			if !strings.Contains(st.FirstIntegrityError, "not zero after its discard") {
				t.Fatalf("first integrity error %q, want the resurrected removed page", st.FirstIntegrityError)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a handler ignoring REMOVE went unnoticed after %d steps (%d removes)", st.Ticks, pager.removes.Load())
		}
		time.Sleep(20 * time.Millisecond)
	}
	pager.check(t)
}
