package instance

import (
	"context"
	"errors"
	"os"
	"strings"
	"sync/atomic"
	"testing"

	dto "github.com/prometheus/client_model/go"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/capacity"
)

// fakeHost is a host with memTotal bytes of RAM and diskFree bytes free,
// both changeable while the test runs.
type fakeHost struct{ memTotal, diskFree atomic.Int64 }

func (h *fakeHost) opt(limits capacity.Limits) testOpt {
	return func(c *Config) {
		c.Capacity = limits
		c.CapacityHost = capacity.Host{
			MemTotal: func() (int64, error) { return h.memTotal.Load(), nil },
			DiskFree: func(string) (int64, error) { return h.diskFree.Load(), nil },
		}
	}
}

func refusedFor(t *testing.T, what string, err error, resource string) {
	t.Helper()
	if !errors.Is(err, api.ErrInsufficientResources) || !strings.Contains(err.Error(), resource) {
		t.Fatalf("%s: %v; want ErrInsufficientResources about %s", what, err, resource)
	}
}

// Finding: one call, `memory_mib: 65536, vcpus: 32` on a 24 GiB machine,
// got 201 in 0.7 s, then its standby ran for four minutes and brought the
// host-wide OOM killer. Now a VM larger than the host, or one more than the
// running VMs' budget, is refused before anything is made; the VMs that fit
// are the twins.
func TestCapacityRefusesVMsTheHostCannotHold(t *testing.T) {
	h := &fakeHost{}
	h.memTotal.Store(256 << 20)
	h.diskFree.Store(1 << 40)
	// 256 MiB × 0.25 = 64 MiB for running VMs: two 32 MiB VMs.
	m := newTestManager(t, h.opt(capacity.Limits{MemoryOvercommit: 0.25, MaxVcpus: 2}))
	ctx := context.Background()
	_, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "huge", MemoryMiB: 512, BootArgs: testBootArgs})
	refusedFor(t, "a 512 MiB VM on a 256 MiB host", err, "memory")
	_, err = m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "wide", MemoryMiB: testMemMiB, Vcpus: 4, BootArgs: testBootArgs})
	refusedFor(t, "4 vCPUs over max_vcpus 2", err, "vcpus")
	if l, _ := m.ListInstances(ctx); len(l) != 0 {
		t.Fatalf("refused creates left %d instances", len(l))
	}
	if ents, _ := os.ReadDir(m.layout.JailsDir()); len(ents) != 0 {
		t.Fatalf("refused creates left %d guest dirs", len(ents))
	}
	createRunning(t, m, "a")
	b := createRunning(t, m, "b")
	_, err = m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "c", MemoryMiB: testMemMiB, BootArgs: testBootArgs})
	refusedFor(t, "a third running VM over the overcommit budget", err, "memory_overcommit")
	// Made without starting it fits (nothing runs); starting it does not.
	f := false
	if _, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "c", MemoryMiB: testMemMiB, BootArgs: testBootArgs, Start: &f}); err != nil {
		t.Fatalf("a VM created stopped: %v", err)
	}
	_, err = m.Action(ctx, "c", "start", api.ActionRequest{})
	refusedFor(t, "start over the budget", err, "memory")
	// Standby frees the budget; the restore that would exceed it again is
	// refused and leaves the VM on standby.
	action(t, m, "b", "standby")
	action(t, m, "c", "start")
	_, err = m.Action(ctx, "b", "restore", api.ActionRequest{})
	refusedFor(t, "restore over the budget", err, "memory")
	if in, _ := m.GetInstance(ctx, "b"); in.State != api.StateStandby {
		t.Errorf("a refused restore left b %s, want Standby", in.State)
	}
	_, err = m.ForkInstance(ctx, "b", api.ForkRequest{Name: "kid", TargetState: api.StateRunning})
	refusedFor(t, "a fork to Running over the budget", err, "memory")
	if _, err := m.ForkInstance(ctx, "b", api.ForkRequest{Name: "kid"}); err != nil {
		t.Errorf("a fork left on standby takes no running budget: %v", err)
	}
	action(t, m, "c", "stop")
	action(t, m, "b", "restore")
	verifyGuest(t, m, b.ID)
}

// A host-wide cap on running VMs, whatever their size.
func TestCapacityCapsRunningVMs(t *testing.T) {
	h := &fakeHost{}
	h.memTotal.Store(24 << 30)
	h.diskFree.Store(1 << 40)
	m := newTestManager(t, h.opt(capacity.Limits{MaxRunningVMs: 1}))
	createRunning(t, m, "a")
	_, err := m.CreateInstance(context.Background(), api.CreateInstanceRequest{Name: "b", MemoryMiB: testMemMiB, BootArgs: testBootArgs})
	refusedFor(t, "a second VM over max_running_vms 1", err, "max_running_vms")
	var pb dto.Metric
	m.met.capacityRefusals.WithLabelValues("create", "running VMs").Write(&pb)
	if n := pb.GetCounter().GetValue(); n != 1 {
		t.Errorf("forkd_capacity_refusals_total{op=create,resource=running VMs} = %v, want 1", n)
	}
}

// A standby whose snapshot cannot fit on disk fails before it starts:
// the VM is not even paused, and nothing is written. With the space back
// (the twin) the same standby succeeds. A fork whose first standby would
// copy the whole RAM (no reflink) is refused up front the same way.
func TestStandbyAndForkThatCannotFitOnDiskFailBeforeWriting(t *testing.T) {
	h := &fakeHost{}
	h.memTotal.Store(24 << 30)
	h.diskFree.Store(1 << 40)
	m := newTestManager(t, h.opt(capacity.Limits{}))
	m.fs.reflink = false // as on ext4: a Full snapshot or an unshare copies the RAM
	ctx := context.Background()
	in := createRunning(t, m, "vm")
	h.diskFree.Store(capacity.DiskReserve + 16<<20) // under 32 MiB of RAM
	_, err := m.Action(ctx, "vm", "standby", api.ActionRequest{})
	refusedFor(t, "standby with too little disk", err, "disk")
	got, _ := m.GetInstance(ctx, "vm")
	g, _ := m.layout.Guest(in.ID)
	if got.State != api.StateRunning || exists(g.Latest().Dir) {
		t.Fatalf("after the refused standby: %s, snapshot dir present %v; want Running and nothing written", got.State, exists(g.Latest().Dir))
	}
	verifyGuest(t, m, in.ID) // still running, never paused for good
	h.diskFree.Store(1 << 40)
	action(t, m, "vm", "standby")
	h.diskFree.Store(capacity.DiskReserve + 16<<20)
	_, err = m.ForkInstance(ctx, "vm", api.ForkRequest{Name: "kid"})
	refusedFor(t, "a fork whose first standby cannot fit", err, "disk")
	if l, _ := m.ListInstances(ctx); len(l) != 1 {
		t.Errorf("the refused fork left %d instances", len(l))
	}
	m.fs.reflink = true // with reflinks the same fork costs no RAM copy
	if _, err := m.ForkInstance(ctx, "vm", api.ForkRequest{Name: "kid"}); err != nil {
		t.Errorf("fork on a reflink filesystem: %v", err)
	}
}
