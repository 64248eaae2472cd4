package daemon

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// hungBackend blocks every Action until release is closed, like a request
// stuck in an uninterruptible open(2) of a FIFO: nothing can cancel it.
type hungBackend struct{ *testBackend }

// startWithTCP starts a daemon on both listeners and returns it, its TCP
// address and the stop func.
func startWithTCP(t *testing.T, cfg Config, b Backend) (*daemon, string, func() error) {
	t.Helper()
	cfg.Listen = "tcp://127.0.0.1:0"
	cfg.TokenFile = filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(cfg.TokenFile, []byte("0123456789abcdef0123\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d, stop := startTest(t, cfg, b)
	return d, d.tcp.String(), stop
}

// refusing waits until nothing accepts connections on network/addr any more.
func refusing(t *testing.T, network, addr string) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		c, err := net.Dial(network, addr)
		if err != nil {
			return
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatalf("%s %s still accepts connections 30 s into the shutdown", network, addr)
		}
	}
}

// On SIGTERM both listeners stop accepting at once, even while an
// operation is in flight; a mutating request that still reaches the daemon
// (on a connection that was already open) gets 503 shutting_down, while the
// operation in flight finishes and is answered.
func TestShutdownStopsBothListenersAndRefusesNewChanges(t *testing.T) {
	b := newTestBackend()
	d, tcp, stop := startWithTCP(t, testConfig(t), b)
	c, _ := api.NewClient(d.socket)
	inflight := make(chan error, 1)
	go func() {
		_, err := c.Action(context.Background(), "web", "standby", api.ActionRequest{})
		inflight <- err
	}()
	<-b.entered
	// A client's keep-alive connection, open before the shutdown.
	late, err := net.Dial("unix", d.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer late.Close()
	lateR := bufio.NewReader(late)
	io.WriteString(late, "GET /health HTTP/1.1\r\nHost: forkd\r\n\r\n")
	if resp, err := http.ReadResponse(lateR, nil); err != nil || resp.StatusCode != 200 {
		t.Fatalf("health on the keep-alive connection: %v %v", resp, err)
	} else {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}

	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	refusing(t, "unix", d.socket)
	refusing(t, "tcp", tcp)

	body := `{"name":"late","memory_mib":16}`
	io.WriteString(late, "POST /instances HTTP/1.1\r\nHost: forkd\r\nContent-Type: application/json\r\nContent-Length: "+strconv.Itoa(len(body))+"\r\n\r\n"+body)
	resp, err := http.ReadResponse(lateR, nil)
	if err != nil {
		t.Fatalf("the late request got no answer: %v", err)
	}
	b2, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(b2), `"shutting_down"`) {
		t.Fatalf("a change sent during shutdown: %d %s; want 503 shutting_down", resp.StatusCode, b2)
	}
	if !resp.Close {
		t.Error("a response during shutdown does not ask the client to close its connection")
	}
	select {
	case err := <-stopped:
		t.Fatalf("the daemon stopped (%v) with a standby still in flight", err)
	default:
	}
	close(b.release)
	if err := <-inflight; err != nil {
		t.Errorf("the standby in flight at SIGTERM: %v; want it answered", err)
	}
	if err := <-stopped; err != nil {
		t.Errorf("stop: %v", err)
	}
	if !b.closed.Load() {
		t.Error("the backend was not closed after the last operation finished")
	}
}

// An operation that never returns (a request hung on a FIFO) cannot hold
// the daemon forever: after shutdown_grace it stops with ErrGraceExpired,
// and it never closes the store under the operation still running.
func TestShutdownEndsAfterTheGraceWithoutClosingTheStoreUnderAHungRequest(t *testing.T) {
	cfg := testConfig(t)
	cfg.ShutdownGrace = 200 * time.Millisecond
	b := hungBackend{newTestBackend()}
	d, tcp, stop := startWithTCP(t, cfg, b)
	t.Cleanup(func() { close(b.release) })
	c, _ := api.NewClient(d.socket)
	go c.Action(context.Background(), "web", "standby", api.ActionRequest{})
	<-b.entered
	err := stop()
	if !errors.Is(err, ErrGraceExpired) || !strings.Contains(err.Error(), "/instances/web/standby") {
		t.Fatalf("stop with a hung request: %v; want ErrGraceExpired naming the request", err)
	}
	if b.closed.Load() {
		t.Fatal("the backend (the store) was closed under an operation still running")
	}
	refusing(t, "unix", d.socket)
	refusing(t, "tcp", tcp)
}

// streamBackend's event subscription never ends on its own.
type streamBackend struct{ *testBackend }

func (streamBackend) Events(ctx context.Context) (<-chan api.Event, error) {
	ch := make(chan api.Event)
	context.AfterFunc(ctx, func() { close(ch) })
	return ch, nil
}

// An event stream a client never hangs up does not hold the daemon open:
// shutdown ends it, and the daemon stops well inside its grace.
func TestShutdownEndsEventStreams(t *testing.T) {
	cfg := testConfig(t)
	b := streamBackend{newTestBackend()}
	d, stop := startTest(t, cfg, b)
	c, _ := api.NewClient(d.socket)
	ended := make(chan error, 1)
	subscribed := make(chan struct{})
	go func() {
		evs, err := c.Events(context.Background())
		close(subscribed)
		if err != nil {
			ended <- err
			return
		}
		for range evs {
		}
		ended <- nil
	}()
	<-subscribed
	if err := stop(); err != nil {
		t.Fatalf("stop with an event stream open: %v", err)
	}
	if err := <-ended; err != nil {
		t.Fatalf("the event stream: %v", err)
	}
	if !b.closed.Load() {
		t.Error("the backend was not closed")
	}
}
