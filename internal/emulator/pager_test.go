package emulator

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/forkd/forkd/internal/pager"
	"github.com/forkd/forkd/internal/testenv"
)

// startPager runs forkd's real pager in this test process.
func startPager(t testing.TB, dir string) *pager.Client {
	t.Helper()
	srv, err := pager.NewServer(pager.Config{Dir: dir, CacheBytes: 64 << 20, Version: "test"},
		slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	c := pager.NewClient(pager.ControlSocket(dir))
	for i := 0; ; i++ {
		if _, err := c.Health(t.Context()); err == nil {
			return c
		} else if i == 500 {
			t.Fatalf("pager did not answer: %v", err)
		}
		select {
		case err := <-done:
			t.Fatalf("pager exited: %v", err)
		default:
		}
	}
}

func TestUffdLoadThroughForkdPager(t *testing.T) {
	requireUffd(t)
	dir := t.TempDir()
	_, vmstate, mem := bootedSnapshot(t, dir, bootSpec{vcpus: 2, memMib: 32, bootArgs: uffdBootArgs}, 6000)
	pc := startPager(t, filepath.Join(dir, "pager"))
	for i, name := range []string{"a", "b"} {
		sess, err := pc.CreateSession(t.Context(), pager.SessionRequest{SessionID: name, BackingPath: mem, CacheKey: "base"})
		if err != nil {
			t.Fatalf("create pager session %s: %v", name, err)
		}
		p := startVMM(t, dir)
		p.loadUffd(vmstate, sess.SocketPath)
		st := p.waitTicks(4000)
		requireClean(t, "restored through the pager "+name, st)
		if i == 1 {
			// A Full snapshot faults in all of RAM through the pager.
			p.pause()
			vmstate2, mem2 := filepath.Join(dir, "via-pager.vmstate"), filepath.Join(dir, "via-pager.mem")
			p.snapshot("Full", vmstate2, mem2)
			q := startVMM(t, dir)
			q.loadFile(vmstate2, mem2, false, true)
			requireClean(t, "File restore of a pager-restored VM", q.waitTicks(2000))
		}
	}
}

// A huge_pages 2M snapshot restores through forkd's own pager: it reads the
// handshake's 2 MiB page size and installs whole huge pages, twice from one
// cache key (the second mostly from the pager's cache).
func TestUffdLoadOfAHugePagesGuestThroughForkdPager(t *testing.T) {
	requireUffd(t)
	testenv.HugePages(t, 3*hugeGuestPages)
	dir := t.TempDir()
	_, vmstate, mem := bootHugeSnapshot(t, dir, DefaultFirecrackerVersion())
	pc := startPager(t, filepath.Join(dir, "pager"))
	for _, name := range []string{"a", "b"} {
		sess, err := pc.CreateSession(t.Context(), pager.SessionRequest{SessionID: name, BackingPath: mem, CacheKey: "huge"})
		if err != nil {
			t.Fatalf("create pager session %s: %v", name, err)
		}
		p := startVMM(t, dir)
		p.loadUffd(vmstate, sess.SocketPath)
		requireClean(t, "huge guest restored through the pager "+name, p.waitTicks(3000))
		if mapped, resident := hugetlbMappings(t, p.cmd.Process.Pid); mapped != 16<<20 || resident == 0 {
			t.Fatalf("restored through the pager %s: %d bytes mapped in 2 MiB pages, %d resident", name, mapped, resident)
		}
	}
}
