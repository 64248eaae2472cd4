package pager

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/uffd"
)

// The test binary doubles as the processes these tests need: a consumer
// (the VMM side of a session: anonymous memory, a uffd, Firecracker's
// handshake) and a pager (`pager serve`, for EnsureRunning). The role comes
// from the environment.
const roleEnv = "FORKD_PAGER_TEST_ROLE"

func TestMain(m *testing.M) {
	switch os.Getenv(roleEnv) {
	case "consumer":
		os.Exit(consumerMain())
	case "pager":
		os.Exit(pagerMain(os.Args[1:]))
	}
	os.Exit(m.Run())
}

// consumerMain plays a VMM restored with the Uffd backend. Environment:
//
//	SOCK      session socket to connect to
//	MEMFILE   the mem-file, to verify pages against
//	SIZE      guest memory bytes
//	PAGESIZE  4096 (anonymous memory) or 2097152 (hugetlb, MAP_HUGE_2MB)
//	REGIONS   how many equal regions SIZE is split into, each its own
//	          mapping, at consecutive mem-file offsets
//	SEED      touch order seed
//	HANDSHAKE good | fc110 (as Firecracker < 1.12) | badjson | nofd | twomsgs | bigregion
//	SCRIPT    comma-separated steps, in 4 KiB pages of the mem-file
//	          whatever PAGESIZE is:
//	  touch:A-B    read pages [A,B) in random order, verify each against MEMFILE
//	  seq:A-B      the same in ascending order
//	  written:A-B  verify pages [A,B) still hold what write:A-B wrote
//	  zeros:A-B    verify pages [A,B) read as zeros
//	  write:A-B    write 0xEE over pages [A,B) (a guest write)
//	  dontneed:A-B madvise(MADV_DONTNEED) pages [A,B) (a balloon discard;
//	               within one region)
//	  wait         print "waiting" and wait for a line on stdin
//	  churn        touch and discard pages forever (to be killed mid-run)
//
// It prints "touch_ns <n> pages <p>" per touch step and "ok" at the end;
// a mismatch prints "MISMATCH ..." and exits 1.
func consumerMain() int {
	fail := func(format string, a ...any) int {
		fmt.Printf("FAIL "+format+"\n", a...)
		return 1
	}
	size, _ := strconv.Atoi(os.Getenv("SIZE"))
	seed, _ := strconv.ParseUint(os.Getenv("SEED"), 10, 64)
	pageSize, _ := strconv.Atoi(os.Getenv("PAGESIZE"))
	nregions, _ := strconv.Atoi(os.Getenv("REGIONS"))
	pageSize, nregions = max(pageSize, uffd.PageSize), max(nregions, 1)
	file, err := os.ReadFile(os.Getenv("MEMFILE"))
	if err != nil {
		return fail("read memfile: %v", err)
	}
	flags := unix.MAP_PRIVATE | unix.MAP_ANONYMOUS | unix.MAP_NORESERVE
	switch pageSize {
	case uffd.PageSize:
	case uffd.HugePageSize:
		// As Firecracker backs guest memory with huge pages: private
		// hugetlb memory, 2 MiB aligned by the kernel.
		flags |= unix.MAP_HUGETLB | unix.MAP_HUGE_2MB
	default:
		return fail("PAGESIZE %d: want %d or %d", pageSize, uffd.PageSize, uffd.HugePageSize)
	}
	regionSize := size / nregions
	if regionSize*nregions != size || regionSize%pageSize != 0 {
		return fail("SIZE %d does not split into %d regions of whole %d-byte pages", size, nregions, pageSize)
	}
	// mems[i] is region i, at mem-file offset i*regionSize; each is its
	// own mapping, so the regions' addresses are unrelated to their offsets.
	var mems [][]byte
	var regions []uffd.Region
	for i := range nregions {
		m, err := unix.Mmap(-1, 0, regionSize, unix.PROT_READ|unix.PROT_WRITE, flags)
		if err != nil {
			return fail("mmap region %d (%d-byte pages): %v", i, pageSize, err)
		}
		mems = append(mems, m)
		regions = append(regions, uffd.Region{BaseHostVirtAddr: uint64(uintptr(unsafe.Pointer(&m[0]))), Size: uint64(regionSize),
			Offset: uint64(i * regionSize), PageSize: uint64(pageSize), PageSizeKiB: uint64(pageSize)})
	}
	// span is mem-file pages [lo, hi) in guest memory; they must lie in
	// one region.
	span := func(lo, hi int) []byte {
		r := lo * uffd.PageSize / regionSize
		if (hi*uffd.PageSize-1)/regionSize != r {
			panic(fmt.Sprintf("pages [%d, %d) span regions", lo, hi))
		}
		off := r * regionSize
		return mems[r][lo*uffd.PageSize-off : hi*uffd.PageSize-off]
	}
	page := func(p int) []byte { return span(p, p+1) }
	f, err := uffd.Open(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		return fail("open uffd: %v", err)
	}
	if err := f.API(uffd.FeatureEventRemove); err != nil {
		return fail("%v", err)
	}
	for _, r := range regions {
		if _, err := f.Register(r.BaseHostVirtAddr, r.Size, uffd.RegisterModeMissing); err != nil {
			return fail("%v", err)
		}
	}
	var self *selfServer
	if os.Getenv("HANDSHAKE") == "self" {
		// The baseline: this process serves its own faults (pread + COPY
		// on a locked thread), no pager, no socket.
		if nregions != 1 || pageSize != uffd.PageSize {
			return fail("HANDSHAKE self serves one region of 4 KiB pages")
		}
		self, err = startSelfServer(f, regions[0].BaseHostVirtAddr, os.Getenv("MEMFILE"))
		if err != nil {
			return fail("self serve: %v", err)
		}
	}
	var conn *net.UnixConn
	if self == nil {
		c, err := net.Dial("unix", os.Getenv("SOCK"))
		if err != nil {
			return fail("dial: %v", err)
		}
		conn = c.(*net.UnixConn)
	}
	switch os.Getenv("HANDSHAKE") {
	case "self":
	case "", "good":
		err = uffd.SendHandshake(conn, regions, f.Fd())
	case "fc110":
		// Firecracker before 1.12: no page_size, and the socket closed
		// right after the handshake while the VMM runs on.
		regions[0].PageSize = 0
		if err = uffd.SendHandshake(conn, regions, f.Fd()); err == nil {
			err = conn.Close()
		}
	case "badjson":
		_, _, err = conn.WriteMsgUnix([]byte(`[{"base_host_virt_addr":`), unix.UnixRights(f.Fd()), nil)
	case "nofd":
		b, _ := json.Marshal(regions)
		_, err = conn.Write(b)
	case "twomsgs":
		if err = uffd.SendHandshake(conn, regions, f.Fd()); err == nil {
			err = uffd.SendHandshake(conn, regions, f.Fd())
		}
	case "bigregion":
		regions[0].Size = uint64(len(file)) + 2*uffd.PageSize
		err = uffd.SendHandshake(conn, regions, f.Fd())
	}
	if err != nil {
		return fail("handshake: %v", err)
	}
	if h := os.Getenv("HANDSHAKE"); h != "" && h != "good" && h != "self" && h != "fc110" {
		// A malformed VMM: wait for the pager to hang up on us.
		conn.SetReadDeadline(time.Now().Add(20 * time.Second))
		n, err := conn.Read(make([]byte, 1))
		fmt.Printf("hangup n=%d err=%v\n", n, err)
		return 0
	}
	rng := rand.New(rand.NewPCG(seed, 1))
	in := bufio.NewScanner(os.Stdin)
	bgDone := make(chan int, 1)
	var runStep func(step string) int
	runStep = func(step string) int {
		name, arg, _ := strings.Cut(step, ":")
		var lo, hi int
		if a, b, ok := strings.Cut(arg, "-"); ok {
			lo, _ = strconv.Atoi(a)
			hi, _ = strconv.Atoi(b)
		}
		switch name {
		case "bg":
			// Another thread of the VMM: the step after "bg:" runs beside
			// the rest of the script until bgwait.
			go func() { bgDone <- runStep(arg) }()
		case "cold":
			// Drop the mem-file (read above) from the page cache again.
			if err := dropPageCache(os.Getenv("MEMFILE"), uint64(lo), uint64(hi)); err != nil {
				return fail("%v", err)
			}
		case "bgwait":
			if rc := <-bgDone; rc != 0 {
				return rc
			}
			fmt.Println("bg done")
		case "touch", "seq":
			var order []int
			if name == "seq" { // no rng: seq may run beside another step
				for i := range hi - lo {
					order = append(order, i)
				}
			} else {
				order = rng.Perm(hi - lo)
			}
			var sink byte
			t0 := time.Now()
			for _, i := range order {
				p := lo + i
				sink += page(p)[i%uffd.PageSize] // the fault
			}
			d := time.Since(t0)
			_ = fmt.Sprint(sink)
			for p := lo; p < hi; p++ {
				want := file[p*uffd.PageSize : (p+1)*uffd.PageSize]
				if !bytes.Equal(page(p), want) {
					return fail("MISMATCH page %d: got %x... want %x...", p, page(p)[:8], want[:8])
				}
			}
			fmt.Printf("touch_ns %d pages %d\n", d.Nanoseconds(), hi-lo)
		case "zeros":
			for p := lo; p < hi; p++ {
				for _, b := range page(p) {
					if b != 0 {
						return fail("MISMATCH page %d not zero after discard", p)
					}
				}
			}
		case "written":
			for p := lo; p < hi; p++ {
				for _, b := range page(p) {
					if b != 0xEE {
						return fail("MISMATCH page %d lost the guest's write", p)
					}
				}
			}
		case "write":
			for p := lo; p < hi; p++ {
				for i := range page(p) {
					page(p)[i] = 0xEE
				}
			}
		case "dontneed":
			if err := unix.Madvise(span(lo, hi), unix.MADV_DONTNEED); err != nil {
				return fail("madvise: %v", err)
			}
		case "wait":
			fmt.Println("waiting")
			in.Scan()
		case "holdsock":
			// Hand the session socket to a child that outlives us, as a VMM
			// leaking the fd to a helper would: the pager then sees no EOF
			// when we exit and must notice through the pidfd.
			sf, err := conn.File()
			if err != nil {
				return fail("socket file: %v", err)
			}
			holder := exec.Command("sleep", "120")
			holder.ExtraFiles = []*os.File{sf}
			if err := holder.Start(); err != nil {
				return fail("holder: %v", err)
			}
			fmt.Printf("holder %d\n", holder.Process.Pid)
		case "churn":
			fmt.Println("churning")
			for i := 0; ; i = (i + 1) % (size / uffd.PageSize) {
				page(i)[0]++
				unix.Madvise(page(i), unix.MADV_DONTNEED)
			}
		case "":
		default:
			return fail("unknown step %q", step)
		}
		return 0
	}
	for _, step := range strings.Split(os.Getenv("SCRIPT"), ",") {
		if rc := runStep(step); rc != 0 {
			return rc
		}
	}
	if self != nil {
		faults, service := self.stop()
		fmt.Printf("service_ns %d faults %d\n", service.Nanoseconds(), faults)
	}
	fmt.Println("ok")
	return 0
}

// selfServer is the minimal in-process handler: pread into an mmap'd
// buffer, UFFDIO_COPY, one locked thread.
type selfServer struct {
	cancel context.CancelFunc
	done   chan struct{}
	faults int
	busy   time.Duration
}

func startSelfServer(f *uffd.FD, base uint64, memfile string) (*selfServer, error) {
	file, err := os.Open(memfile)
	if err != nil {
		return nil, err
	}
	buf, err := unix.Mmap(-1, 0, uffd.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &selfServer{cancel: cancel, done: make(chan struct{})}
	go func() {
		runtime.LockOSThread()
		defer close(s.done)
		msgs := make([]uffd.Msg, 64)
		for {
			n, err := f.ReadMsgs(msgs)
			if err != nil {
				if f.WaitReadable(ctx) != nil {
					return
				}
				continue
			}
			for _, m := range msgs[:n] {
				if m.Event != uffd.EventPagefault {
					continue
				}
				t0 := time.Now()
				page := m.Address &^ (uffd.PageSize - 1)
				file.ReadAt(buf, int64(page-base))
				f.Copy(uintptr(page), uintptr(unsafe.Pointer(&buf[0])), uffd.PageSize, 0)
				s.busy += time.Since(t0)
				s.faults++
			}
		}
	}()
	return s, nil
}

func (s *selfServer) stop() (int, time.Duration) {
	s.cancel()
	<-s.done
	return s.faults, s.busy
}

// pagerMain is `pager serve` for EnsureRunning tests: the args after
// "pager serve", as EnsureRunning passes them.
func pagerMain(args []string) int {
	if len(args) < 2 || args[0] != "pager" || args[1] != "serve" {
		fmt.Fprintf(os.Stderr, "pager role: want 'pager serve ...', got %q\n", args)
		return 2
	}
	opt := MainOptions{Version: os.Getenv("FORKD_PAGER_TEST_VERSION"), DefaultPriority: os.Getenv(defaultPriorityEnv) != ""}
	for i := 2; i < len(args); i++ {
		next := func() string { i++; return args[i] }
		switch args[i] {
		case "--version":
			fmt.Println(opt.Version)
			return 0
		case "--dir":
			opt.Dir = next()
		case "--cache-bytes":
			opt.CacheBytes, _ = strconv.ParseInt(next(), 10, 64)
		case "--log-path":
			opt.LogPath = next()
		}
	}
	if err := Main(context.Background(), opt); err != nil {
		return 1
	}
	return 0
}
