package pager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/uffd"
)

const (
	testPages  = 4096 // 16 MiB: ~0.3 s of faults on this nested VM
	testSize   = testPages * uffd.PageSize
	zeroPage   = 100  // written as zeros: data that reads all-zero
	holeLo     = 1024 // [holeLo, holeHi) is a hole in the mem-file
	holeHi     = 1280
	dataPages  = testPages - (holeHi - holeLo)
	cacheBytes = 64 << 20
)

func TestConsumerReadsEveryByteOfTheMemFile(t *testing.T) {
	requireUffd(t)
	p := startPager(t, Config{CacheBytes: cacheBytes})
	mem := memFile(t, p.dir, testPages, zeroPage, holeLo, holeHi)
	s := p.create(t, "vm-a", mem, "snap-1")
	c := startConsumer(t, s.SocketPath, mem, testSize, "good", fmt.Sprintf("touch:0-%d,wait", testPages))
	c.expect("waiting")
	st := p.sessionStats(t, "vm-a")
	c.resume()
	c.finish()
	// A fault interrupted by a signal (the Go runtime's preemption) is
	// raised again after the handler, so a page can fault twice: the second
	// finds the page in and is not served again (duplicate_test.go).
	if st.Faults < testPages {
		t.Errorf("faults = %d, want >= %d (one per page)", st.Faults, testPages)
	}
	if want := uint64(holeHi - holeLo + 1); st.ZeroPages != want {
		t.Errorf("zero pages = %d, want %d (the hole + the all-zero page)", st.ZeroPages, want)
	}
	if st.Misses != dataPages || st.Hits != 0 {
		t.Errorf("misses/hits = %d/%d, want %d/0 (a cold cache reads every data page once)", st.Misses, st.Hits, dataPages)
	}
	if want := uint64(dataPages * uffd.PageSize); st.BackingBytes != want {
		t.Errorf("backing bytes = %d, want %d", st.BackingBytes, want)
	}
	if st.Pid == 0 || st.State != stateServing {
		t.Errorf("session pid %d state %q, want the consumer's pid and %q", st.Pid, st.State, stateServing)
	}
	p.waitSessions(t, 0)
	if !strings.Contains(p.logs.String(), "the VMM closed the session socket") {
		t.Errorf("log lacks the session's end on EOF:\n%s", p.logs.String())
	}
	if _, err := os.Stat(s.SocketPath); !os.IsNotExist(err) {
		t.Errorf("session socket %s still exists after the session ended (%v)", s.SocketPath, err)
	}
}

// TestSecondConsumerOfACacheKeyReadsNoBackingBytes: the page cache is
// shared by sessions of one cache key (a fork's siblings); its twin shows a
// different key does read the mem-file.
func TestSecondConsumerOfACacheKeyReadsNoBackingBytes(t *testing.T) {
	requireUffd(t)
	tests := []struct {
		name        string
		secondKey   string
		wantBacking bool
	}{
		{"same cache key hits", "snap-1", false},
		{"other cache key misses", "snap-2", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := startPager(t, Config{CacheBytes: cacheBytes})
			mem := memFile(t, p.dir, testPages, zeroPage, holeLo, holeHi)
			script := fmt.Sprintf("touch:0-%d", testPages)
			s := p.create(t, "first", mem, "snap-1")
			startConsumer(t, s.SocketPath, mem, testSize, "good", script).finish()
			p.waitSessions(t, 0)

			// The second VM maps a hardlink of the same mem-file, as a fork does.
			link := mem + ".fork"
			if err := os.Link(mem, link); err != nil {
				t.Fatal(err)
			}
			s2 := p.create(t, "second", link, tt.secondKey)
			c := startConsumer(t, s2.SocketPath, link, testSize, "good", script+",wait")
			c.expect("waiting")
			st := p.sessionStats(t, "second")
			c.resume()
			c.finish()
			if tt.wantBacking {
				if want := uint64(dataPages * uffd.PageSize); st.BackingBytes != want {
					t.Fatalf("other key: backing bytes %d, want %d (its own cold read)", st.BackingBytes, want)
				}
				return
			}
			if st.BackingBytes != 0 || st.Misses != 0 {
				t.Errorf("second consumer read %d backing bytes (%d misses), want 0", st.BackingBytes, st.Misses)
			}
			if st.Hits < dataPages || st.HitRate() != 1 {
				t.Errorf("second consumer hits %d (rate %.3f), want >= %d (100%%)", st.Hits, st.HitRate(), dataPages)
			}
		})
	}
}

// TestDiscardedPagesReadAsZeros: MADV_DONTNEED in the VMM (a balloon)
// yields UFFD_EVENT_REMOVE; those pages must read as zeros afterwards, not
// as mem-file data, whether a fault or a working-set replay would bring
// them in. The twins disable the pager's memory of removed ranges (for
// faults, and for replay only) and the consumer sees stale data.
func TestDiscardedPagesReadAsZeros(t *testing.T) {
	requireUffd(t)
	tests := []struct {
		name     string
		prefetch bool // replay a recording of every page, the discarded ones first
		cfg      Config
		twin     bool
	}{
		{"removed ranges remembered", false, Config{}, false},
		{"twin: removed ranges forgotten", false, Config{ignoreRemoves: true}, true},
		{"replay skips removed ranges", true, Config{}, false},
		{"twin: replay forgets removed ranges", true, Config{prefetchIgnoresRemoves: true}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hold := make(chan struct{})
			tt.cfg.CacheBytes, tt.cfg.holdPrefetch = cacheBytes, hold
			p := startPager(t, tt.cfg)
			mem := memFile(t, p.dir, 512, -1, 0, 0)
			req := SessionRequest{SessionID: "vm", BackingPath: mem, CacheKey: "abc"}
			if tt.prefetch {
				var order []uint64
				for pg := uint64(32); pg < 96; pg++ {
					order = append(order, pg)
				}
				for pg := uint64(0); pg < 512; pg++ {
					if pg < 32 || pg >= 96 {
						order = append(order, pg)
					}
				}
				req.PrefetchPath = writeRecording(t, p.dir, "abc", 512, order)
			}
			s, err := p.client.CreateSession(context.Background(), req)
			if err != nil {
				t.Fatal(err)
			}
			// Guest writes pages 0-63, the balloon discards 32-95: all of
			// 32-95 must read zero, whether they were written or never
			// touched. Replay is held until the discard is done.
			c := startConsumer(t, s.SocketPath, mem, 512*uffd.PageSize, "good",
				"touch:0-32,write:0-64,dontneed:32-96,wait,zeros:32-96,touch:96-512,written:0-32,wait")
			c.expect("waiting")
			close(hold)
			if tt.prefetch {
				waitFor(t, "replay to finish", func() bool { return p.sessionStats(t, "vm").Prefetch.Done })
			}
			c.resume()
			if tt.twin {
				line := c.expect("FAIL")
				if !strings.Contains(line, "not zero after discard") {
					t.Fatalf("twin: consumer failed with %q, want a non-zero discarded page", line)
				}
				return
			}
			c.expect("waiting")
			st := p.sessionStats(t, "vm")
			c.resume()
			c.finish()
			if st.Removes < 1 {
				t.Errorf("removes = %d, want >= 1", st.Removes)
			}
			if st.RemovedFaults < 64 {
				t.Errorf("removed faults = %d, want >= 64 (pages 32-95 read after the discard)", st.RemovedFaults)
			}
			if tt.prefetch && (st.PrefetchedPages < 380 || st.Prefetch.Error != "") {
				t.Errorf("replay installed %d pages (error %q), want the ~430 outside the discarded and written ranges",
					st.PrefetchedPages, st.Prefetch.Error)
			}
		})
	}
}

func TestKilledConsumerEndsSessionWithoutLeaks(t *testing.T) {
	requireUffd(t)
	p := startPager(t, Config{CacheBytes: cacheBytes})
	mem := memFile(t, p.dir, 256, -1, 0, 0)
	settle := func() {
		p.stats(t)
		p.client.http.CloseIdleConnections()
	}
	settle()
	fds, goroutines := countFDs(t), 0
	waitFor(t, "fds settle", func() bool { settle(); fds = countFDs(t); time.Sleep(20 * time.Millisecond); return countFDs(t) == fds })
	goroutines = numGoroutines()

	s := p.create(t, "doomed", mem, "snap")
	c := startConsumer(t, s.SocketPath, mem, 256*uffd.PageSize, "good", "touch:0-64,churn")
	c.expect("churning")
	dl := time.Now().Add(30 * time.Second)
	for p.sessionStats(t, "doomed").Faults <= 200 && time.Now().Before(dl) {
		time.Sleep(10 * time.Millisecond)
	}
	if st := p.sessionStats(t, "doomed"); st.Faults <= 200 {
		// Show where the consumer's threads wait (a lost wakeup leaves one
		// in userfaultfd_event_wait_completion).
		out, _ := exec.Command("sh", "-c", fmt.Sprintf("for t in /proc/%d/task/*; do echo $t; cat $t/stack; done", c.cmd.Process.Pid)).CombinedOutput()
		t.Fatalf("consumer stopped faulting: %d faults, %d removes\n%s", st.Faults, st.Removes, out)
	}
	if err := c.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	p.waitSessions(t, 0)
	settle()
	waitFor(t, fmt.Sprintf("open fds back to %d", fds), func() bool { settle(); return countFDs(t) == fds })
	settleGoroutines(t, goroutines)
	if !strings.Contains(p.logs.String(), `session=doomed`) || !strings.Contains(p.logs.String(), "session ended") {
		t.Errorf("log lacks the killed session's end:\n%s", p.logs.String())
	}
}

func TestMalformedHandshakeEndsOnlyThatSession(t *testing.T) {
	requireUffd(t)
	p := startPager(t, Config{CacheBytes: cacheBytes, HandshakeTimeout: 2 * time.Second})
	mem := memFile(t, p.dir, testPages, zeroPage, holeLo, holeHi)
	good := p.create(t, "good", mem, "snap")
	half := testPages / 2
	gc := startConsumer(t, good.SocketPath, mem, testSize, "good", fmt.Sprintf("touch:0-%d,wait,touch:%d-%d", half, half, testPages))
	gc.expect("waiting")

	tests := []struct {
		handshake, wantLog string
	}{
		{"badjson", "parse uffd handshake"},
		{"nofd", "carried no descriptor"},
		{"twomsgs", "protocol error"},
		{"bigregion", "ends past the end of"},
	}
	for _, tt := range tests {
		t.Run(tt.handshake, func(t *testing.T) {
			id := "bad-" + tt.handshake
			s := p.create(t, id, mem, "snap")
			c := startConsumer(t, s.SocketPath, mem, testSize, tt.handshake, "")
			c.expect("hangup")
			waitFor(t, "log line for "+id, func() bool {
				for _, l := range strings.Split(p.logs.String(), "\n") {
					if strings.Contains(l, "session="+id) && strings.Contains(l, "session ended") && strings.Contains(l, tt.wantLog) {
						return true
					}
				}
				return false
			})
			waitFor(t, id+" gone", func() bool {
				for _, ss := range p.stats(t).Sessions {
					if ss.SessionID == id {
						return false
					}
				}
				return true
			})
			// Its creator can learn why: GET /sessions/{id} is still 404
			// (the session is gone) but says how it ended.
			_, err := p.client.Session(context.Background(), id)
			if !IsNotFound(err) || !strings.Contains(err.Error(), tt.wantLog) {
				t.Errorf("GET /sessions/%s after a refused handshake: %v; want a 404 saying %q", id, err, tt.wantLog)
			}
		})
	}
	// The good session kept serving throughout.
	gc.resume()
	gc.finish()
}

func TestDrainWaitsForLiveSessions(t *testing.T) {
	requireUffd(t)
	p := startPager(t, Config{CacheBytes: cacheBytes})
	mem := memFile(t, p.dir, 256, -1, 0, 0)
	s := p.create(t, "live", mem, "snap")
	c := startConsumer(t, s.SocketPath, mem, 256*uffd.PageSize, "good", "touch:0-128,wait,touch:128-256")
	c.expect("waiting")
	ctx := context.Background()
	if err := p.client.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	h, err := p.client.Health(ctx)
	if err != nil || !h.Draining || h.Sessions != 1 {
		t.Fatalf("health during drain = %+v, %v; want draining with 1 session", h, err)
	}
	_, err = p.client.CreateSession(ctx, SessionRequest{SessionID: "late", BackingPath: mem, CacheKey: "snap"})
	var ae *APIError
	if !errors.As(err, &ae) || ae.Status != http.StatusServiceUnavailable {
		t.Fatalf("create during drain: %v, want 503", err)
	}
	select {
	case err := <-p.done:
		t.Fatalf("pager exited (%v) while a session was live", err)
	case <-time.After(200 * time.Millisecond):
	}
	c.resume() // the draining pager still serves the live VM
	c.finish()
	select {
	case err := <-p.done:
		p.done <- err
		if err != nil {
			t.Fatalf("drained pager: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("pager did not exit after its last session closed")
	}
	for _, f := range []string{ControlSocket(p.dir), PidFile(p.dir)} {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("%s left behind after drain (%v)", f, err)
		}
	}
}

func TestPopulateInstallsEverythingThenUnregisters(t *testing.T) {
	requireUffd(t)
	p := startPager(t, Config{CacheBytes: cacheBytes})
	mem := memFile(t, p.dir, testPages, zeroPage, holeLo, holeHi)
	s := p.create(t, "vm", mem, "snap")
	c := startConsumer(t, s.SocketPath, mem, testSize, "good",
		fmt.Sprintf("touch:0-16,dontneed:2000-2100,wait,touch:0-2000,zeros:2000-2100,touch:2100-%d,wait", testPages))
	c.expect("waiting")
	ctx := context.Background()
	if err := p.client.Populate(ctx, "vm"); err != nil {
		t.Fatal(err)
	}
	before := p.sessionStats(t, "vm")
	if before.State != statePopulated {
		t.Fatalf("state after populate = %q, want %q", before.State, statePopulated)
	}
	c.resume()
	c.expect("waiting")
	after := p.sessionStats(t, "vm")
	if err := p.client.Populate(ctx, "vm"); err != nil {
		t.Errorf("second populate: %v, want nil (already populated)", err)
	}
	c.resume()
	c.finish()
	if after.Faults != before.Faults {
		t.Errorf("faults went from %d to %d after populate: pages were left to the pager", before.Faults, after.Faults)
	}
	// Data pages not yet touched, minus the all-zero page and the removed
	// range, which the kernel zero-fills once the range is unregistered.
	if want := uint64(dataPages - 16 - 1 - 100); before.PopulatedPages != want {
		t.Errorf("populated pages = %d, want %d", before.PopulatedPages, want)
	}
}

func TestSessionLifecycleErrors(t *testing.T) {
	requireUffd(t)
	p := startPager(t, Config{CacheBytes: cacheBytes, AcceptTimeout: 300 * time.Millisecond})
	mem := memFile(t, p.dir, 16, -1, 0, 0)
	link := filepath.Join(p.dir, "memory-link")
	if err := os.Symlink(mem, link); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	status := func(err error) int {
		var ae *APIError
		if errors.As(err, &ae) {
			return ae.Status
		}
		return 0
	}
	tests := []struct {
		name string
		req  SessionRequest
		want int
	}{
		{"id with a slash", SessionRequest{SessionID: "a/b", BackingPath: mem, CacheKey: "k"}, 400},
		{"dot-dot id", SessionRequest{SessionID: "..", BackingPath: mem, CacheKey: "k"}, 400},
		{"relative backing path", SessionRequest{SessionID: "x", BackingPath: "memory", CacheKey: "k"}, 400},
		{"missing backing file", SessionRequest{SessionID: "x", BackingPath: mem + ".nope", CacheKey: "k"}, 400},
		{"backing is a directory", SessionRequest{SessionID: "x", BackingPath: p.dir, CacheKey: "k"}, 400},
		{"no cache key", SessionRequest{SessionID: "x", BackingPath: mem}, 400},
		{"negative record_pages", SessionRequest{SessionID: "x", BackingPath: mem, CacheKey: "k", RecordPages: -1}, 400},
		{"relative prefetch_path", SessionRequest{SessionID: "x", BackingPath: mem, CacheKey: "k", PrefetchPath: "rec.ws"}, 400},
		{"record and replay at once", SessionRequest{SessionID: "x", BackingPath: mem, CacheKey: "k", RecordPages: 1, PrefetchPath: mem}, 400},
		// The pager serves forkd's mem-files only: nothing outside its data
		// dir, nothing through a symlink (the good sessions of every other
		// test are the twin).
		{"backing outside the data dir", SessionRequest{SessionID: "x", BackingPath: "/etc/passwd", CacheKey: "k"}, 400},
		{"backing through a symlink", SessionRequest{SessionID: "x", BackingPath: link, CacheKey: "k"}, 400},
		{"prefetch_path outside the data dir", SessionRequest{SessionID: "x", BackingPath: mem, CacheKey: "k", PrefetchPath: "/etc/passwd"}, 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := p.client.CreateSession(ctx, tt.req)
			if got := status(err); got != tt.want {
				t.Fatalf("create %+v: %v (status %d), want %d", tt.req, err, got, tt.want)
			}
		})
	}
	t.Run("duplicate id", func(t *testing.T) {
		p.create(t, "dup", mem, "k")
		_, err := p.client.CreateSession(ctx, SessionRequest{SessionID: "dup", BackingPath: mem, CacheKey: "k"})
		if status(err) != 409 {
			t.Fatalf("duplicate: %v, want 409", err)
		}
		if err := p.client.Populate(ctx, "dup"); status(err) != 409 {
			t.Fatalf("populate before the VMM connects: %v, want 409", err)
		}
		if err := p.client.DeleteSession(ctx, "dup"); err != nil {
			t.Fatal(err)
		}
		if err := p.client.DeleteSession(ctx, "dup"); err != nil {
			t.Fatalf("second delete: %v, want nil (idempotent)", err)
		}
		if err := p.client.Populate(ctx, "dup"); status(err) != 404 || !IsNotFound(err) {
			t.Fatalf("populate of a deleted session: %v, want 404", err)
		}
	})
	t.Run("accept timeout ends a session nobody connects to", func(t *testing.T) {
		s := p.create(t, "lonely", mem, "k")
		if _, err := os.Stat(s.SocketPath); err != nil {
			t.Fatalf("session socket not listening when create returned: %v", err)
		}
		p.waitSessions(t, 0)
		if !strings.Contains(p.logs.String(), "no VMM connected") {
			t.Errorf("log lacks the accept timeout:\n%s", p.logs.String())
		}
		if _, err := os.Stat(s.SocketPath); !os.IsNotExist(err) {
			t.Errorf("socket %s left behind", s.SocketPath)
		}
	})
}

// TestGetSessionAnswersOnlyForALiveSession: GET /sessions/{id} answers one
// session's fields while it lives, and 404 for an id never created or for a
// session whose consumer was killed once the pager has freed it: the
// manager's check of a Uffd VM's session relies on that 404.
func TestGetSessionAnswersOnlyForALiveSession(t *testing.T) {
	requireUffd(t)
	p := startPager(t, Config{CacheBytes: cacheBytes})
	const pages = 64
	mem := memFile(t, p.dir, pages, -1, 0, 0)
	ctx := context.Background()
	s := p.create(t, "live", mem, "snap-k")
	c := startConsumer(t, s.SocketPath, mem, pages*uffd.PageSize, "good", fmt.Sprintf("touch:0-%d,wait", pages))
	c.expect("waiting")

	t.Run("a served session is 200 with its fields", func(t *testing.T) {
		resp, err := p.client.http.Get("http://pager/sessions/live")
		if err != nil {
			t.Fatal(err)
		}
		var raw map[string]any
		err = json.NewDecoder(resp.Body).Decode(&raw)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || err != nil {
			t.Fatalf("GET /sessions/live: %d (decode: %v), want 200 with JSON", resp.StatusCode, err)
		}
		for _, k := range []string{"session_id", "cache_key", "backing_path", "pid", "state", "faults", "fault_latency"} {
			if _, ok := raw[k]; !ok {
				t.Errorf("reply lacks %q: %v", k, raw)
			}
		}
		got, err := p.client.Session(ctx, "live")
		if err != nil {
			t.Fatal(err)
		}
		want := SessionInfo{SessionID: "live", CacheKey: "snap-k", BackingPath: mem, State: stateServing,
			Pid: c.cmd.Process.Pid, Regions: 1, MemoryBytes: pages * uffd.PageSize}
		if got.SessionID != want.SessionID || got.CacheKey != want.CacheKey || got.BackingPath != want.BackingPath ||
			got.State != want.State || got.Pid != want.Pid || got.Regions != want.Regions || got.MemoryBytes != want.MemoryBytes {
			t.Errorf("session = %+v\nwant fields %+v", got, want)
		}
		if got.Faults < pages || got.Misses != pages {
			t.Errorf("faults/misses = %d/%d, want >= %d/%d (its own counters: every page touched once)", got.Faults, got.Misses, pages, pages)
		}
	})

	for _, id := range []string{"never-created", "a/b", "LIVE"} {
		t.Run("unknown id "+id+" is 404", func(t *testing.T) {
			_, err := p.client.Session(ctx, id)
			var ae *APIError
			if !IsNotFound(err) || !errors.As(err, &ae) || ae.Code != "not_found" {
				t.Fatalf("session %q: %v, want a 404 not_found", id, err)
			}
		})
	}

	t.Run("a session whose consumer was killed is 404 once freed", func(t *testing.T) {
		if err := c.cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		var err error
		waitFor(t, "GET /sessions/live to stop answering 200", func() bool {
			_, err = p.client.Session(ctx, "live")
			return err != nil
		})
		if !IsNotFound(err) {
			t.Fatalf("session of a killed consumer: %v, want 404", err)
		}
		// 404 means freed: nothing of the session is left.
		if st := p.stats(t); st.ActiveSessions != 0 {
			t.Errorf("stats still list %d sessions after the 404: %+v", st.ActiveSessions, st.Sessions)
		}
		if !strings.Contains(p.logs.String(), "session ended") {
			t.Errorf("log lacks the session's end:\n%s", p.logs.String())
		}
	})
}

func TestSecondPagerCannotTakeTheSameDir(t *testing.T) {
	p := startPager(t, Config{})
	_, err := NewServer(Config{Dir: p.dir}, p.srv.log)
	if err == nil || !strings.Contains(err.Error(), "another pager") {
		t.Fatalf("second NewServer on %s: %v, want 'another pager holds this directory'", p.dir, err)
	}
	pid, err := os.ReadFile(PidFile(p.dir))
	if err != nil || strings.TrimSpace(string(pid)) != fmt.Sprint(os.Getpid()) {
		t.Fatalf("pid file %q, %v; want %d", pid, err, os.Getpid())
	}
	if _, err := os.Stat(filepath.Join(p.dir, "sessions")); err != nil {
		t.Fatal(err)
	}
}

// TestVMMExitSeenThroughPidfd: a VMM whose session socket outlives it (a
// child inherited the fd) sends no EOF; the pidfd from SO_PEERCRED still
// ends the session when the VMM exits.
func TestVMMExitSeenThroughPidfd(t *testing.T) {
	requireUffd(t)
	p := startPager(t, Config{CacheBytes: cacheBytes})
	mem := memFile(t, p.dir, 64, -1, 0, 0)
	s := p.create(t, "leaky", mem, "snap")
	c := startConsumer(t, s.SocketPath, mem, 64*uffd.PageSize, "good", "touch:0-64,holdsock")
	line := c.expect("holder")
	var holder int
	fmt.Sscanf(line, "holder %d", &holder)
	t.Cleanup(func() { syscall.Kill(holder, syscall.SIGKILL) })
	c.finish()
	p.waitSessions(t, 0)
	if !strings.Contains(p.logs.String(), "exited)") {
		t.Errorf("session did not end through the pidfd:\n%s", p.logs.String())
	}
}

// Firecracker before 1.12 closes the handshake socket right after sending
// and runs on: the session must keep serving it (its pidfd, not the
// socket's EOF, tells its exit), then end when it exits.
func TestSessionOutlivesAHandshakeSocketClosedEarly(t *testing.T) {
	requireUffd(t)
	p := startPager(t, Config{CacheBytes: cacheBytes})
	mem := memFile(t, p.dir, 64, -1, 0, 0)
	s := p.create(t, "fc110", mem, "snap")
	c := startConsumer(t, s.SocketPath, mem, 64*uffd.PageSize, "fc110", "touch:0-8,wait,touch:8-64")
	c.expect("waiting")
	// The socket was closed before the first touch; every later fault must
	// still be served (a session ended on EOF would leave them hanging).
	c.resume()
	c.finish() // touches the rest (each page verified) and exits
	p.waitSessions(t, 0)
	if !strings.Contains(p.logs.String(), "exited)") {
		t.Errorf("session did not end through the pidfd:\n%s", p.logs.String())
	}
}

func TestDeleteDuringHandshakeDoesNotWaitForItsTimeout(t *testing.T) {
	requireUffd(t)
	p := startPager(t, Config{CacheBytes: cacheBytes, HandshakeTimeout: 10 * time.Minute})
	mem := memFile(t, p.dir, 16, -1, 0, 0)
	s := p.create(t, "mute", mem, "snap")
	conn, err := net.Dial("unix", s.SocketPath) // connects, never sends the handshake
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	waitFor(t, "the pager to accept", func() bool { return p.sessionStats(t, "mute").State == stateHandshake })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := p.client.DeleteSession(ctx, "mute"); err != nil {
		t.Fatalf("delete during the handshake: %v", err)
	}
	p.waitSessions(t, 0)
}

// TestConcurrentConsumersOfOneKey: three VMs of one snapshot faulting at
// once through the shared cache all read exactly the mem-file's bytes, and
// the mem-file is read once per page.
func TestConcurrentConsumersOfOneKey(t *testing.T) {
	requireUffd(t)
	p := startPager(t, Config{CacheBytes: cacheBytes})
	mem := memFile(t, p.dir, 1024, 10, 500, 600)
	var cs []*consumer
	for i := range 3 {
		s := p.create(t, fmt.Sprintf("vm-%d", i), mem, "snap")
		cs = append(cs, startConsumer(t, s.SocketPath, mem, 1024*uffd.PageSize, "good", "touch:0-1024"))
	}
	for _, c := range cs {
		c.finish()
	}
	p.waitSessions(t, 0)
	st := p.stats(t)
	if st.Faults < 3*1024 {
		t.Errorf("faults = %d, want >= %d", st.Faults, 3*1024)
	}
	if want := uint64(3 * (1024 - 100)); st.Hits+st.Misses < want {
		t.Errorf("hits+misses = %d, want >= %d data-page lookups", st.Hits+st.Misses, want)
	}
	// Concurrent misses share one read: each data page is read once in all.
	if st.Misses != 1024-100 || st.BackingBytes != (1024-100)*uffd.PageSize {
		t.Errorf("misses %d, backing bytes %d; want each of the %d data pages read once", st.Misses, st.BackingBytes, 1024-100)
	}
}
