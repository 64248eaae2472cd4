package prefetch

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/testenv"
)

// The test binary doubles as a process that maps a file MAP_PRIVATE, as a
// File-restored VMM maps its mem-file, and touches pages when told.
const roleEnv = "FORKD_PREFETCH_TEST_ROLE"

func TestMain(m *testing.M) {
	if os.Getenv(roleEnv) == "mapper" {
		os.Exit(mapperMain())
	}
	os.Exit(m.Run())
}

// mapperMain maps $MEMFILE and runs stdin commands, answering "done" to each:
//
//	touch P,Q,...   read one byte of each page
//	write P,...     write one byte of each page (a private copy)
func mapperMain() int {
	f, err := os.Open(os.Getenv("MEMFILE"))
	if err != nil {
		fmt.Println("FAIL", err)
		return 1
	}
	st, _ := f.Stat()
	mem, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err != nil {
		fmt.Println("FAIL", err)
		return 1
	}
	ps := os.Getpagesize()
	fmt.Println("ready")
	sc := bufio.NewScanner(os.Stdin)
	var sink byte
	for sc.Scan() {
		cmd, arg, _ := strings.Cut(sc.Text(), " ")
		for _, s := range strings.Split(arg, ",") {
			p, err := strconv.Atoi(s)
			if err != nil {
				continue
			}
			switch cmd {
			case "touch":
				sink += mem[p*ps+p%ps]
			case "write":
				mem[p*ps]++
			}
		}
		fmt.Println("done", sink)
	}
	return 0
}

type mapper struct {
	t     *testing.T
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Scanner
}

func startMapper(t *testing.T, path string) *mapper {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), roleEnv+"=mapper", "MEMFILE="+path)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	m := &mapper{t: t, cmd: cmd, stdin: stdin, out: bufio.NewScanner(stdout)}
	m.expect("ready")
	return m
}

func (m *mapper) expect(prefix string) {
	m.t.Helper()
	if !m.out.Scan() || !strings.HasPrefix(m.out.Text(), prefix) {
		m.t.Fatalf("mapper said %q (%v), want %q", m.out.Text(), m.out.Err(), prefix)
	}
}

// do runs one command in the mapper and waits until it is done.
func (m *mapper) do(cmd string, pages ...uint64) {
	m.t.Helper()
	s := make([]string, len(pages))
	for i, p := range pages {
		s[i] = strconv.FormatUint(p, 10)
	}
	if _, err := fmt.Fprintf(m.stdin, "%s %s\n", cmd, strings.Join(s, ",")); err != nil {
		m.t.Fatal(err)
	}
	m.expect("done")
}

// cachedFile writes a file of n random pages, so every page is in the page
// cache (as a mem-file is right after the snapshot that wrote it).
func cachedFile(t *testing.T, n int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "memory")
	b := make([]byte, n*os.Getpagesize())
	rand.Read(b)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// window is the 2 MiB (512-page) block of page p. A read fault maps more
// than its page when the page cache holds it: the cached pages of its
// 64 KiB fault-around window, or its whole folio, which a file written or
// read ahead in large chunks has up to 2 MiB large (mapped by one PMD).
func openFile(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func window(p uint64) uint64 { return p / 512 }

func inWindowsOf(p uint64, touched []uint64) bool {
	return slices.ContainsFunc(touched, func(q uint64) bool { return window(q) == window(p) })
}

// TestSamplerSeesOneProcessesTouchesNotThePageCache: right after a file is
// written every page of it is cached, so its residency says nothing about
// what a VMM touched; the pages the process mapped do. The twin is
// residency itself, which reports the whole file.
func TestSamplerSeesOneProcessesTouchesNotThePageCache(t *testing.T) {
	const pages = 4096 // 8 blocks of 2 MiB; the touches are in 3 of them
	path := cachedFile(t, pages)
	res, err := OpenResidency(openFile(t, path))
	if err != nil {
		t.Fatal(err)
	}
	defer res.Close()
	resident, total, err := res.Count([]Run{{0, pages}})
	if err != nil {
		t.Fatal(err)
	}
	if resident != pages || total != pages {
		t.Fatalf("twin: residency of a freshly written file = %d/%d pages, want all %d (it cannot tell touches apart)", resident, total, pages)
	}

	m := startMapper(t, path)
	s, err := NewSampler(m.cmd.Process.Pid, openFile(t, path))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	sample := func() []uint64 {
		var got []uint64
		if err := s.Sample(func(p uint64) { got = append(got, p) }); err != nil {
			t.Fatal(err)
		}
		return got
	}
	if got := sample(); len(got) != 0 {
		t.Fatalf("%d pages sampled before any touch, want none", len(got))
	}
	check := func(touched, mustSee []uint64) {
		t.Helper()
		got := sample()
		for _, p := range mustSee {
			if !slices.Contains(got, p) {
				t.Errorf("touched page %d not sampled (got %d pages: %v...)", p, len(got), head(got))
			}
		}
		for _, p := range got {
			if !inWindowsOf(p, touched) {
				t.Fatalf("page %d sampled, in a 2 MiB block nothing touched (touched %v)", p, touched)
			}
		}
	}
	read := []uint64{0, 100, 900, 2000}
	m.do("touch", read...)
	check(read, read)
	// A write maps a private copy, which the sampler sees as well. (On a
	// 2 MiB mapping of the file the copy-on-write also unmaps the block's
	// other pages: sampling over time, as RecordMapped does, keeps them.)
	m.do("write", 3000)
	check(append(read, 3000), []uint64{3000})
}

// TestRecordMappedKeepsFirstTouchOrder: pages touched before a sample come
// before pages first touched after it.
func TestRecordMappedKeepsFirstTouchOrder(t *testing.T) {
	path := cachedFile(t, 2048)
	m := startMapper(t, path)
	early, late := []uint64{1800, 1801}, []uint64{10, 11}
	m.do("touch", early...)
	opt := RecordOptions{Window: time.Minute, Interval: time.Millisecond}
	opt.afterSample = func(n int) bool {
		if n == 1 {
			m.do("touch", late...)
		}
		return n == 2
	}
	rec, err := RecordMapped(context.Background(), m.cmd.Process.Pid, openFile(t, path), "abc", opt)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Key != "abc" || rec.Source != SourceFile || rec.PageSize != uint32(os.Getpagesize()) || rec.FileSize != 2048*int64(os.Getpagesize()) {
		t.Fatalf("recording header %+v", rec)
	}
	if err := rec.Validate(); err != nil {
		t.Fatal(err)
	}
	lastEarly, firstLate := -1, len(rec.Pages)
	for i, p := range rec.Pages {
		switch {
		case inWindowsOf(p, early):
			lastEarly = i
		case inWindowsOf(p, late):
			firstLate = min(firstLate, i)
		default:
			t.Errorf("page %d recorded, near neither touch", p)
		}
	}
	for _, p := range append(slices.Clone(early), late...) {
		if !slices.Contains(rec.Pages, p) {
			t.Errorf("touched page %d not recorded: %v", p, rec.Pages)
		}
	}
	if lastEarly > firstLate {
		t.Fatalf("recording %v: an early page at %d comes after a late one at %d", rec.Pages, lastEarly, firstLate)
	}
}

func TestRecordMappedStopsAtItsBudgets(t *testing.T) {
	file := cachedFile(t, 1024)
	m := startMapper(t, file)
	m.do("touch", 0, 100, 200, 300, 400, 500)
	pid := m.cmd.Process.Pid
	path := openFile(t, file)

	t.Run("size", func(t *testing.T) {
		rec, err := RecordMapped(context.Background(), pid, path, "abc", RecordOptions{Window: time.Hour, MaxPages: 3})
		if err != nil {
			t.Fatal(err)
		}
		if len(rec.Pages) != 3 {
			t.Fatalf("%d pages recorded, want the budget of 3", len(rec.Pages))
		}
	})
	t.Run("time", func(t *testing.T) {
		rec, err := RecordMapped(context.Background(), pid, path, "abc", RecordOptions{Window: 50 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if len(rec.Pages) < 6 || rec.Window != 50*time.Millisecond {
			t.Fatalf("recorded %d pages in a window of %v, want >= 6 in 50ms", len(rec.Pages), rec.Window)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := RecordMapped(ctx, pid, path, "abc", RecordOptions{Window: time.Hour}); !errors.Is(err, context.Canceled) {
			t.Fatalf("a cancelled recording returned %v, want context.Canceled", err)
		}
	})
	t.Run("process gone", func(t *testing.T) {
		m.cmd.Process.Kill()
		m.cmd.Wait()
		if _, err := RecordMapped(context.Background(), pid, path, "abc", RecordOptions{Window: time.Hour}); !errors.Is(err, ErrProcessGone) {
			t.Fatalf("recording a dead process: %v, want ErrProcessGone", err)
		}
	})
}

// TestPopulateFillsOnlyTheRuns: runs dropped from the page cache are there
// when Populate returns; a page outside them is not; runs already cached
// are not read again.
func TestPopulateFillsOnlyTheRuns(t *testing.T) {
	path := cachedFile(t, 4096)
	if err := testenv.EvictPageCache(path); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := OpenResidency(f)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Close()
	runs := []Run{{600, 10}, {100, 50}}
	if resident, _, _ := res.Count([]Run{{0, 4096}}); resident != 0 {
		t.Fatalf("%d pages still cached after DONTNEED, want 0 (cannot test readahead here)", resident)
	}
	read, err := Populate(context.Background(), f, runs)
	if err != nil {
		t.Fatal(err)
	}
	if want := uint64(60 * os.Getpagesize()); read != want {
		t.Errorf("Populate read %d bytes, want the runs' %d", read, want)
	}
	if absent, err := res.Absent(runs); err != nil || len(absent) != 0 {
		t.Fatalf("%d pages of the runs absent after Populate (%v): %v", len(absent), err, head(absent))
	}
	// The kernel's own readahead may read past a run; far past it, nothing.
	if absent, _ := res.Absent([]Run{{3500, 1}}); len(absent) != 1 {
		t.Errorf("page 3500, 11 MiB past every run, is cached: Populate read more than asked")
	}
	if read, err := Populate(context.Background(), f, runs); err != nil || read != 0 {
		t.Errorf("a second Populate of cached runs read %d bytes (%v), want 0", read, err)
	}
}
