package pager

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// ensurePager runs EnsureRunning with this test binary as the pager binary
// (TestMain's "pager" role reports version via FORKD_PAGER_TEST_VERSION).
func ensurePager(t *testing.T, root, version string) (*Client, error) {
	t.Helper()
	t.Setenv(roleEnv, "pager")
	t.Setenv("FORKD_PAGER_TEST_VERSION", version)
	return EnsureRunning(context.Background(), StartOptions{
		Binary: os.Args[0], Dir: filepath.Join(root, version), Version: version, CacheBytes: 1 << 20,
	}, slog.New(slog.NewTextHandler(io.Discard, nil)))
}

// stopPager drains a detached pager and waits for its process to go.
func stopPager(t *testing.T, c *Client) {
	t.Helper()
	h, err := c.Health(context.Background())
	if err != nil {
		return
	}
	c.Drain(context.Background())
	waitFor(t, "pager exit", func() bool { return syscall.Kill(h.Pid, 0) != nil })
}

func TestEnsureRunningStartsOneDetachedPagerAndDrainsOldVersions(t *testing.T) {
	root := shortTempDir(t)
	// Leftovers of a pager that died: a dead control socket and pid file.
	if err := os.MkdirAll(filepath.Join(root, "v1"), 0o700); err != nil {
		t.Fatal(err)
	}
	dead, err := net.Listen("unix", ControlSocket(filepath.Join(root, "v1")))
	if err != nil {
		t.Fatal(err)
	}
	dead.(*net.UnixListener).SetUnlinkOnClose(false)
	dead.Close()
	os.WriteFile(PidFile(filepath.Join(root, "v1")), []byte("999999\n"), 0o644)

	v1, err := ensurePager(t, root, "v1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopPager(t, v1) })
	h1, err := v1.Health(context.Background())
	if err != nil || h1.Version != "v1" || h1.Pid == os.Getpid() {
		t.Fatalf("health = %+v, %v; want v1 in another process", h1, err)
	}
	if sid, _ := unix.Getsid(h1.Pid); sid != h1.Pid {
		t.Errorf("pager session id %d, want its own session %d (setsid: survives the daemon)", sid, h1.Pid)
	}
	// A second call finds the running pager instead of starting another.
	again, err := ensurePager(t, root, "v1")
	if err != nil {
		t.Fatal(err)
	}
	if h, _ := again.Health(context.Background()); h.Pid != h1.Pid {
		t.Fatalf("second EnsureRunning answered by pid %d, want the running %d", h.Pid, h1.Pid)
	}
	if _, err := os.Stat(filepath.Join(root, "v1", "pager.log")); err != nil {
		t.Errorf("pager log: %v", err)
	}

	// An upgrade: v2 starts, and v1 (no sessions) drains and exits.
	v2, err := ensurePager(t, root, "v2")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopPager(t, v2) })
	waitFor(t, "v1 to exit after drain", func() bool { return syscall.Kill(h1.Pid, 0) != nil })
	if _, err := os.Stat(ControlSocket(filepath.Join(root, "v1"))); !os.IsNotExist(err) {
		t.Errorf("v1 control socket left behind: %v", err)
	}
	if h, err := v2.Health(context.Background()); err != nil || h.Version != "v2" {
		t.Fatalf("v2 health = %+v, %v", h, err)
	}
}

func TestEnsureRunningRefusesABinaryOfAnotherVersion(t *testing.T) {
	root := shortTempDir(t)
	t.Setenv(roleEnv, "pager")
	t.Setenv("FORKD_PAGER_TEST_VERSION", "v9")
	_, err := EnsureRunning(context.Background(), StartOptions{
		Binary: os.Args[0], Dir: filepath.Join(root, "v1"), Version: "v1", StartTimeout: time.Second,
	}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err == nil || !strings.Contains(err.Error(), `is version "v9", want "v1"`) {
		t.Fatalf("EnsureRunning with a v9 binary for v1: %v, want a version error", err)
	}
}

func TestCollectorExportsPagerMetrics(t *testing.T) {
	p := startPager(t, Config{CacheBytes: 1 << 20})
	// gather maps each family to its first sample's gauge value (0 for
	// other types): enough to see what is exported.
	gather := func(fetch func(context.Context) (Stats, error)) map[string]float64 {
		reg := prometheus.NewPedanticRegistry()
		reg.MustRegister(NewCollector(fetch))
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]float64{}
		for _, mf := range mfs {
			out[mf.GetName()] = mf.GetMetric()[0].GetGauge().GetValue()
		}
		return out
	}
	up := gather(p.client.Stats)
	for _, name := range []string{"forkd_pager_up", "forkd_pager_faults_total", "forkd_pager_cache_hits_total",
		"forkd_pager_cache_misses_total", "forkd_pager_backing_read_bytes_total", "forkd_pager_fault_duration_seconds",
		"forkd_pager_sessions_active", "forkd_pager_cache_bytes", "forkd_pager_cache_evictions_total",
		"forkd_pager_prefetched_pages_total", "forkd_pager_prefetch_probes_total", "forkd_pager_prefetch_probe_faults_total",
		"forkd_pager_cold_reads_total"} {
		if _, ok := up[name]; !ok {
			t.Errorf("metric %s missing", name)
		}
	}
	if v := up["forkd_pager_up"]; v != 1 {
		t.Errorf("forkd_pager_up = %v, want 1", v)
	}
	if v := up["forkd_pager_cache_budget_bytes"]; v != 1<<20 {
		t.Errorf("forkd_pager_cache_budget_bytes = %v, want %d", v, 1<<20)
	}
	// The twin: a pager that does not answer reports up 0 and nothing else.
	down := gather(NewClient(filepath.Join(p.dir, "nope.sock")).Stats)
	if v, ok := down["forkd_pager_up"]; len(down) != 1 || !ok || v != 0 {
		t.Errorf("unreachable pager gathered %v, want only forkd_pager_up 0", down)
	}
}
