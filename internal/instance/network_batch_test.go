package instance

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/testnet"
)

// serveManager serves m through the real API handler on a Unix socket and
// returns a client of it: the batch tests below make their calls as a
// client of the daemon does.
func serveManager(t *testing.T, m *Manager) *api.Client {
	t.Helper()
	h, err := api.NewHandler(m, api.HandlerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(shortDir(t), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	c, err := api.NewClient(sock)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestForkBatchAnswersTheMomentItReturns makes a batch of 6 forks of a
// networked Standby VM to Running in one call (the warm pool keeps 4
// networks: some forks take one made ahead, at least 2 make their own),
// then a batch of 3 of a snapshot of it restored through the pager. Every
// fork has an address and a namespace of its own, and its first ping and
// first GET /, sent after the batch call returns, succeed with no retry and
// report its source's boot_id.
func TestForkBatchAnswersTheMomentItReturns(t *testing.T) {
	tn := testnet.New(t)
	var env netEnv
	c := serveManager(t, netManager(t, tn, &env))
	ctx := context.Background()
	src, err := c.CreateInstance(ctx, api.CreateInstanceRequest{Name: "src", MemoryMiB: testMemMiB, BootArgs: testBootArgs})
	if err != nil {
		t.Fatal(err)
	}
	p := tn.NewPinger()
	seq := 0
	next := func() int { seq++; return seq }
	source := firstContact(t, tn, p, src, next())
	if _, err := c.Action(ctx, "src", "standby", api.ActionRequest{}); err != nil {
		t.Fatal(err)
	}
	seen := map[string]string{src.Network.Address: "src"}
	namespaces := map[string]string{src.Network.Namespace: "src"}
	check := func(forks []api.Instance, name string, n int) {
		t.Helper()
		if len(forks) != n {
			t.Fatalf("a batch of %d returned %d forks", n, len(forks))
		}
		for i, f := range forks {
			if want := fmt.Sprintf("%s-%d", name, i+1); f.Name != want {
				t.Fatalf("fork %d of the batch is %q, want %q", i, f.Name, want)
			}
			if f.State != api.StateRunning || !f.Network.Enabled || f.Network.Address == "" || f.Network.Namespace == "" {
				t.Fatalf("%s: state %s, network %+v; want Running with an address and a namespace", f.Name, f.State, f.Network)
			}
			if other, ok := seen[f.Network.Address]; ok {
				t.Fatalf("%s has address %s, already %s's", f.Name, f.Network.Address, other)
			}
			if other, ok := namespaces[f.Network.Namespace]; ok {
				t.Fatalf("%s has namespace %s, already %s's", f.Name, f.Network.Namespace, other)
			}
			seen[f.Network.Address], namespaces[f.Network.Namespace] = f.Name, f.Name
		}
		// Only once the batch call returned: every fork answers its
		// first request.
		for _, f := range forks {
			if g := firstContact(t, tn, p, f, next()); g.BootID != source.BootID {
				t.Fatalf("%s reports boot_id %s, want its source's %s", f.Name, g.BootID, source.BootID)
			}
		}
	}
	forks, err := c.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "b", Count: 6, TargetState: api.StateRunning})
	if err != nil {
		t.Fatal(err)
	}
	check(forks, "b", 6)
	if _, err := c.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "snap"}); err != nil {
		t.Fatal(err)
	}
	forks, err = c.ForkSnapshotBatch(ctx, "snap", api.ForkBatchRequest{Name: "s", Count: 3, TargetState: api.StateRunning, RestoreBackend: api.BackendUffd})
	if err != nil {
		t.Fatal(err)
	}
	check(forks, "s", 3)
	present, err := env.host.Present()
	if err != nil {
		t.Fatal(err)
	}
	if len(present) < len(seen) {
		t.Fatalf("%d networks present for %d networked VMs", len(present), len(seen))
	}
}

// TestForkBatchAnswerCheckCatchesADownTAP is the twin of the check above:
// with every TAP left down after its VMM attaches (DisableTAPActivation),
// the batch still returns Running forks, and the first request to each of
// them must fail.
func TestForkBatchAnswerCheckCatchesADownTAP(t *testing.T) {
	tn := testnet.New(t)
	var env netEnv
	c := serveManager(t, netManager(t, tn, &env, func(c *Config) { c.DisableTAPActivation = true }))
	ctx := context.Background()
	if _, err := c.CreateInstance(ctx, api.CreateInstanceRequest{Name: "src", MemoryMiB: testMemMiB, BootArgs: testBootArgs}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Action(ctx, "src", "standby", api.ActionRequest{}); err != nil {
		t.Fatal(err)
	}
	forks, err := c.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "b", Count: 2, TargetState: api.StateRunning})
	if err != nil {
		t.Fatal(err)
	}
	p := tn.NewPinger()
	for i, f := range forks {
		if f.State != api.StateRunning {
			t.Fatalf("%s: %s, want Running", f.Name, f.State)
		}
		_, err := contact(tn, p, f, i+1)
		if err == nil {
			t.Fatalf("%s answered its first request with its TAP down: the check could not fail", f.Name)
		}
		t.Logf("the check fails, as it must: %v", err)
	}
}

// TestForkBatchPastThePoolFailsWhole: a batch of more networked forks than
// the pool has free addresses is refused whole (409 address_pool_exhausted)
// and leaves no fork, slot, namespace, dir or open journal entry. Its twin
// is the batch of exactly the free addresses that follows: it succeeds, so
// the refusal was the pool's and the refused batch held no slot; after it
// the pool is full and a batch of one is refused too.
func TestForkBatchPastThePoolFailsWhole(t *testing.T) {
	var env netEnv
	m := newTestManager(t, withNetwork(t, &env, "198.18.0.0/29"), func(c *Config) { c.NetworkDefault = true }) // 5 addresses
	c := serveManager(t, m)
	ctx := context.Background()
	if _, err := c.CreateInstance(ctx, api.CreateInstanceRequest{Name: "src", MemoryMiB: testMemMiB, BootArgs: testBootArgs}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Action(ctx, "src", "standby", api.ActionRequest{}); err != nil {
		t.Fatal(err)
	}
	type footprint struct{ instances, networks, namespaces, dirs, open int }
	count := func() footprint {
		t.Helper()
		var f footprint
		l, err := c.ListInstances(ctx)
		if err != nil {
			t.Fatal(err)
		}
		p, err := env.host.Present()
		if err != nil {
			t.Fatal(err)
		}
		ns, err := filepath.Glob("/var/run/netns/forkd-" + network.Tag(m.cfg.DataDir) + "-*")
		if err != nil {
			t.Fatal(err)
		}
		ents, err := os.ReadDir(m.layout.JailsDir())
		if err != nil {
			t.Fatal(err)
		}
		open, err := m.db.OpenEntries(ctx)
		if err != nil {
			t.Fatal(err)
		}
		f.instances, f.networks, f.namespaces, f.dirs, f.open = len(l), len(p), len(ns), len(ents), len(open)
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), ".tmp-") {
				t.Errorf("half-made dir left: %s", e.Name())
			}
		}
		return f
	}
	refused := func(n int, name string) {
		t.Helper()
		before := count()
		_, err := c.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: name, Count: n, TargetState: api.StateRunning})
		var se *api.StatusError
		if !errors.As(err, &se) || se.Status != http.StatusConflict || se.Code != api.CodePoolExhausted {
			t.Fatalf("a batch of %d past the pool: %v; want 409 %s", n, err, api.CodePoolExhausted)
		}
		if after := count(); after != before {
			t.Fatalf("a refused batch of %d left instances, networks, namespaces, dirs, open entries %+v; before it %+v", n, after, before)
		}
	}
	refused(5, "over") // 4 addresses free
	forks, err := c.ForkInstanceBatch(ctx, "src", api.ForkBatchRequest{Name: "fit", Count: 4, TargetState: api.StateRunning})
	if err != nil {
		t.Fatalf("a batch of exactly the 4 free addresses after the refused one: %v", err)
	}
	for _, f := range forks {
		if f.State != api.StateRunning || !f.Network.Enabled {
			t.Fatalf("%s: %s, network %+v", f.Name, f.State, f.Network)
		}
	}
	refused(1, "more")
	if f := count(); f.instances != 5 || f.networks != 5 || f.namespaces != 5 {
		t.Fatalf("a full pool of 5: %+v", f)
	}
}
