package reliability

import (
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// readHeaderTimeout is the daemon's http.Server ReadHeaderTimeout
// (internal/daemon/run.go); the margin absorbs a loaded 2-core machine.
const (
	readHeaderTimeout = 10 * time.Second
	timeoutMargin     = 10 * time.Second
)

// TestSlowClientsNeitherStallTheDaemonNorHoldConnections opens 30
// slowloris connections that send a header byte at a time and never finish
// their headers, and 10 that send headers and then dribble a body. While
// they hang on, the daemon keeps answering and can create and stand by a
// VM. The header dribblers are cut off by the server's ReadHeaderTimeout
// (each is closed within that timeout plus a margin); none of the slow
// requests creates anything.
func TestSlowClientsNeitherStallTheDaemonNorHoldConnections(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil)
	sock := d.Layout.Socket()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	type result struct {
		closedAfter time.Duration
		err         error
	}
	headerResults := make(chan result, 30)
	// opened counts the slow connections in place (connected, first bytes
	// sent): the daemon is tested while all 40 hold a connection.
	var opened sync.WaitGroup
	opened.Add(40)
	for i := 0; i < 30; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := net.Dial("unix", sock)
			if err != nil {
				opened.Done()
				headerResults <- result{err: err}
				return
			}
			defer conn.Close()
			start := time.Now()
			io.WriteString(conn, "POST /instances HTTP/1.1\r\nHost: forkd\r\nX-Slow: ")
			opened.Done()
			// Dribble a byte every 200 ms; a read error or EOF means the
			// server hung up.
			closed := make(chan struct{})
			go func() {
				buf := make([]byte, 512)
				for {
					if _, err := conn.Read(buf); err != nil {
						close(closed)
						return
					}
				}
			}()
			tick := time.NewTicker(200 * time.Millisecond)
			defer tick.Stop()
			deadline := time.After(readHeaderTimeout + timeoutMargin)
			for {
				select {
				case <-closed:
					headerResults <- result{closedAfter: time.Since(start)}
					return
				case <-deadline:
					headerResults <- result{err: fmt.Errorf("still open after %v", time.Since(start))}
					return
				case <-tick.C:
					if _, err := conn.Write([]byte("a")); err != nil {
						<-closed
						headerResults <- result{closedAfter: time.Since(start)}
						return
					}
				}
			}
		}()
	}
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			conn, err := net.Dial("unix", sock)
			if err != nil {
				opened.Done()
				return
			}
			defer conn.Close()
			body := fmt.Sprintf(`{"name":"slow-body-%d","memory_mib":%d}`, i, testMemMiB)
			fmt.Fprintf(conn, "POST /instances HTTP/1.1\r\nHost: forkd\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n", len(body)+100)
			opened.Done()
			for j := 0; ; j++ {
				select {
				case <-stop:
					return // hang up mid-body
				case <-time.After(300 * time.Millisecond):
				}
				if _, err := conn.Write([]byte{body[j%len(body)]}); err != nil {
					return
				}
			}
		}(i)
	}
	addFigure("slow_connections", 40)

	// Meanwhile the daemon serves others.
	opened.Wait()
	if _, err := d.Client.Health(ctxT(t, 10*time.Second)); err != nil {
		t.Errorf("health during the slowloris: %v", err)
	}
	in := createRunning(t, d.Client, "busy")
	if got := action(t, d.Client, "busy", "standby"); got.State != api.StateStandby {
		t.Errorf("standby during the slowloris: %s", got.State)
	}

	for i := 0; i < 30; i++ {
		r := <-headerResults
		if r.err != nil {
			t.Errorf("slow-header connection: %v (ReadHeaderTimeout %v)", r.err, readHeaderTimeout)
		}
	}
	close(stop)
	wg.Wait()
	list, err := d.Client.ListInstances(ctxT(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].ID != in.ID {
		t.Errorf("slow requests created instances: %+v", list)
	}
	checkAll(t, d)
}
