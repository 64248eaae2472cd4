package api_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/api"
)

// serveUnix serves h on a real Unix socket in a temp dir.
func serveUnix(t *testing.T, h http.Handler) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "forkd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func TestClientDrivesServiceOverUnixSocket(t *testing.T) {
	ctx := context.Background()
	h, err := api.NewHandler(newFakeService(), api.HandlerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sock := serveUnix(t, h)
	for _, host := range []string{sock, "unix://" + sock} {
		c, err := api.NewClient(host)
		if err != nil {
			t.Fatalf("NewClient(%q): %v", host, err)
		}
		if hl, err := c.Health(ctx); err != nil || hl.Status != "ok" {
			t.Fatalf("Health over %s: %+v, %v", host, hl, err)
		}
	}
	c, _ := api.NewClient(sock)
	inst, err := c.CreateInstance(ctx, api.CreateInstanceRequest{Name: "web", MemoryMiB: 512})
	if err != nil || inst.Name != "web" || inst.State != api.StateRunning || inst.Vcpus != api.DefaultVcpus {
		t.Fatalf("CreateInstance: %+v, %v", inst, err)
	}
	if inst, err = c.Action(ctx, "web", "standby", api.ActionRequest{}); err != nil || inst.State != api.StateStandby {
		t.Fatalf("standby: %+v, %v", inst, err)
	}
	fork, err := c.ForkInstance(ctx, "web", api.ForkRequest{Name: "web-1"})
	if err != nil || fork.Source != "instance:"+inst.ID {
		t.Fatalf("fork: %+v, %v", fork, err)
	}
	snap, err := c.CreateSnapshot(ctx, "web", api.SnapshotRequest{Name: "s1"})
	if err != nil || snap.Compression != "none" {
		t.Fatalf("snapshot: %+v, %v", snap, err)
	}
	if _, err := c.ForkSnapshot(ctx, "s1", api.ForkRequest{Name: "s1-a"}); err != nil {
		t.Fatalf("fork snapshot: %v", err)
	}
	list, err := c.ListInstances(ctx)
	if err != nil || len(list) != 3 {
		t.Fatalf("ListInstances: %d instances, %v; want 3", len(list), err)
	}
	if err := c.DeleteSnapshot(ctx, "s1"); err != nil {
		t.Fatalf("DeleteSnapshot: %v", err)
	}
	if err := c.DeleteInstance(ctx, "web"); err != nil {
		t.Fatalf("DeleteInstance: %v", err)
	}
	_, err = c.GetInstance(ctx, "web")
	if !errors.Is(err, api.ErrNotFound) {
		t.Fatalf("GetInstance after delete: %v, want ErrNotFound", err)
	}
	if raw, err := c.PagerStats(ctx); err != nil || !strings.Contains(string(raw), "hits") {
		t.Fatalf("PagerStats: %s, %v", raw, err)
	}
	if spec, err := c.OpenAPI(ctx); err != nil || !strings.HasPrefix(string(spec), "openapi: 3") {
		t.Fatalf("OpenAPI: %.40q, %v", spec, err)
	}
}

func TestClientReportsUnreachableDaemon(t *testing.T) {
	c, err := api.NewClient(filepath.Join(t.TempDir(), "nobody.sock"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Health(context.Background())
	var ce *api.ConnectError
	if !errors.As(err, &ce) {
		t.Fatalf("Health on a missing socket: %v, want a *api.ConnectError", err)
	}
}

func TestNewClientRejectsUnknownSchemes(t *testing.T) {
	for _, host := range []string{"", "ftp://x", "tcp://no-port"} {
		if _, err := api.NewClient(host); err == nil {
			t.Errorf("NewClient(%q) succeeded, want an error", host)
		}
	}
}
