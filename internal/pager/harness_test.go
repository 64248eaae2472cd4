package pager

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/testenv"
	"github.com/forkd/forkd/internal/uffd"
)

// requireUffd stops t where userfaultfd cannot be used for kernel and user
// faults (not root, no /dev/userfaultfd access): a skip, or a failure under
// FORKD_TEST_REQUIRE=uffd.
func requireUffd(t testing.TB) {
	t.Helper()
	f, err := uffd.Open(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		testenv.Need(t, testenv.Uffd, fmt.Sprintf("userfaultfd unavailable (run as root): %v", err))
	}
	f.Close()
}

// syncBuffer is a goroutine-safe log sink tests can search.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type testPager struct {
	srv    *Server
	client *Client
	dir    string
	logs   *syncBuffer
	done   chan error
	cancel context.CancelFunc
}

// shortTempDir keeps socket paths well under the 108-byte limit.
func shortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "pg")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// startPager runs a pager in this process; the consumers are other processes.
func startPager(t testing.TB, cfg Config) *testPager {
	t.Helper()
	if cfg.Dir == "" {
		cfg.Dir = filepath.Join(shortTempDir(t), "pager")
	}
	if cfg.Version == "" {
		cfg.Version = "test"
	}
	logs := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv, err := NewServer(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &testPager{srv: srv, client: NewClient(ControlSocket(cfg.Dir)), dir: cfg.Dir, logs: logs, done: make(chan error, 1), cancel: cancel}
	go func() { p.done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-p.done:
		case <-time.After(30 * time.Second):
			t.Error("pager did not stop")
		}
		if t.Failed() {
			t.Logf("pager log:\n%s", logs.String())
		}
	})
	return p
}

// memFile writes a mem-file of pages pages: random data, except page
// zeroPage written as zeros (data that reads all-zero) and pages
// [holeLo, holeHi) left as a hole.
func memFile(t testing.TB, dir string, pages, zeroPage, holeLo, holeHi int) string {
	t.Helper()
	return memFileOf(t, filepath.Join(dir, fmt.Sprintf("memory-%d", pages)), pages, func(p int) pageFill {
		switch {
		case p >= holeLo && p < holeHi:
			return fillHole
		case p == zeroPage:
			return fillZeros
		}
		return fillData
	})
}

// pageFill is what memFileOf puts in a 4 KiB page of a mem-file.
type pageFill int

const (
	fillData  pageFill = iota // random bytes
	fillZeros                 // zeros written: data that reads all-zero
	fillHole                  // nothing written: a hole
)

// memFileOf writes a mem-file of pages 4 KiB pages at path, each filled as
// fill says.
func memFileOf(t testing.TB, path string, pages int, fill func(p int) pageFill) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(pages * uffd.PageSize)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, uffd.PageSize)
	for p := 0; p < pages; p++ {
		switch fill(p) {
		case fillHole:
			continue
		case fillZeros:
			clear(buf)
		default:
			rand.Read(buf)
		}
		if _, err := f.WriteAt(buf, int64(p*uffd.PageSize)); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

type consumer struct {
	t     testing.TB
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
	out   *syncBuffer
	done  chan error
}

// guestMemory is how a consumer lays out its guest memory: the page size
// of its regions and how many regions it splits SIZE into.
type guestMemory struct {
	// pageSize is uffd.PageSize (anonymous memory, the default) or
	// uffd.HugePageSize (hugetlb memory: 2 MiB pages from the host's pool,
	// see testenv.HugePages).
	pageSize int
	// regions splits the memory into that many equal regions, each its own
	// mapping, at consecutive mem-file offsets (0: one).
	regions int
}

// huge2M is one region of 2 MiB pages.
var huge2M = guestMemory{pageSize: uffd.HugePageSize}

// startConsumer re-executes the test binary as a consumer process, with
// one region of 4 KiB pages unless mem says otherwise.
func startConsumer(t testing.TB, sock, memfile string, size int, handshake, script string, mem ...guestMemory) *consumer {
	t.Helper()
	layout := guestMemory{pageSize: uffd.PageSize, regions: 1}
	if len(mem) > 0 {
		layout = mem[0]
		layout.regions = max(layout.regions, 1)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), roleEnv+"=consumer", "SOCK="+sock, "MEMFILE="+memfile,
		fmt.Sprintf("SIZE=%d", size), "SEED=7", "HANDSHAKE="+handshake, "SCRIPT="+script,
		fmt.Sprintf("PAGESIZE=%d", layout.pageSize), fmt.Sprintf("REGIONS=%d", layout.regions))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	c := &consumer{t: t, cmd: cmd, stdin: stdin, lines: make(chan string, 64), out: &syncBuffer{}, done: make(chan error, 1)}
	cmd.Stderr = c.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			fmt.Fprintln(c.out, sc.Text())
			c.lines <- sc.Text()
		}
		close(c.lines)
		c.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-c.done
	})
	return c
}

// expect waits for an output line starting with prefix.
func (c *consumer) expect(prefix string) string {
	c.t.Helper()
	l, err := c.await(prefix, 60*time.Second)
	if err != nil {
		c.t.Fatalf("%v; output:\n%s", err, c.out.String())
	}
	return l
}

// printsWithin reports whether the consumer prints a line starting with
// prefix within d (a twin's check that something does not happen).
func (c *consumer) printsWithin(prefix string, d time.Duration) bool {
	_, err := c.await(prefix, d)
	return err == nil
}

// await reads output lines until one starts with prefix, or the consumer
// fails, exits, or says nothing of the kind within d.
func (c *consumer) await(prefix string, d time.Duration) (string, error) {
	timeout := time.After(d)
	for {
		select {
		case l, ok := <-c.lines:
			if !ok {
				return "", fmt.Errorf("consumer exited before printing %q", prefix)
			}
			if strings.HasPrefix(l, prefix) {
				return l, nil
			}
			if strings.HasPrefix(l, "FAIL") {
				return "", fmt.Errorf("consumer failed: %s", l)
			}
		case <-timeout:
			return "", fmt.Errorf("consumer did not print %q in %v", prefix, d)
		}
	}
}

// finish waits for a clean exit after "ok".
func (c *consumer) finish() {
	c.t.Helper()
	c.expect("ok")
	for range c.lines {
	}
	select {
	case err := <-c.done:
		c.done <- err
		if err != nil {
			c.t.Fatalf("consumer exit: %v; output:\n%s", err, c.out.String())
		}
	case <-time.After(30 * time.Second):
		c.t.Fatal("consumer did not exit")
	}
}

func (c *consumer) resume() {
	c.t.Helper()
	if _, err := io.WriteString(c.stdin, "go\n"); err != nil {
		c.t.Fatal(err)
	}
}

func (p *testPager) create(t testing.TB, id, backing, key string) Session {
	t.Helper()
	s, err := p.client.CreateSession(context.Background(), SessionRequest{SessionID: id, BackingPath: backing, CacheKey: key})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (p *testPager) stats(t testing.TB) Stats {
	t.Helper()
	st, err := p.client.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func (p *testPager) sessionStats(t testing.TB, id string) SessionInfo {
	t.Helper()
	for _, s := range p.stats(t).Sessions {
		if s.SessionID == id {
			return s
		}
	}
	t.Fatalf("no session %s in stats", id)
	return SessionInfo{}
}

// waitFor polls cond until it holds or 30 s pass.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (p *testPager) waitSessions(t testing.TB, n int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d active sessions", n), func() bool { return p.stats(t).ActiveSessions == n })
}

func countFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// settleGoroutines waits for the goroutine count to come back to at most
// want (goroutines exit asynchronously after a session ends).
func settleGoroutines(t testing.TB, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > want {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			t.Fatalf("goroutines: %d, want <= %d (leak)\n%s", runtime.NumGoroutine(), want, buf[:n])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func numGoroutines() int { return runtime.NumGoroutine() }

// checkTwin judges what a test's checks found: nothing, with its safety
// rule on; something, with it switched off (the twin, described by off),
// which is logged.
func checkTwin(t *testing.T, twin bool, problems []string, off string) {
	t.Helper()
	switch {
	case !twin && len(problems) > 0:
		t.Errorf("%s", strings.Join(problems, "\n"))
	case twin && len(problems) == 0:
		t.Errorf("twin: %s the checks found nothing", off)
	case twin:
		t.Logf("twin caught: %s", strings.Join(problems, "; "))
	}
}
