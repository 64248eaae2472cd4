package instance

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/testenv"
)

// hugetlbMiB is how much of pid's memory is mapped in 2 MiB pages
// (/proc/pid/smaps: the Size of every mapping whose KernelPageSize is
// 2048 kB).
func hugetlbMiB(t *testing.T, pid int) int {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var size, total int
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var kb int
		switch line := sc.Text(); {
		case strings.HasPrefix(line, "Size:"):
			fmt.Sscanf(line, "Size: %d kB", &size)
		case strings.HasPrefix(line, "KernelPageSize:"):
			if _, err := fmt.Sscanf(line, "KernelPageSize: %d kB", &kb); err == nil && kb == 2048 {
				total += size
			}
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return total >> 10
}

// A VM created with huge_pages 2M runs on 2 MiB pages, and so do its
// restores, its forks and the forks of its snapshots: every one of them
// through the pager, the only backend Firecracker restores such memory
// with, whatever the daemon's default. Asking for a File restore is refused
// before anything changes.
func TestHugePageVMsRestoreAndForkThroughThePager(t *testing.T) {
	needUffd(t)
	// The source, three forks and a snapshot's fork may run at once; each
	// holds at most its whole memory.
	testenv.HugePages(t, 6*testMemMiB/2)
	m := newTestManager(t) // restore and fork defaults: file
	ctx := context.Background()
	src, err := m.CreateInstance(ctx, api.CreateInstanceRequest{
		Name: "src", MemoryMiB: testMemMiB, BootArgs: testBootArgs, HugePages: api.HugePages2M,
	})
	if err != nil {
		t.Fatalf("create with huge_pages 2M: %v", err)
	}
	if src.State != api.StateRunning || src.HugePages != api.HugePages2M || src.RestoreBackend != api.BackendUffd {
		t.Fatalf("created %+v; want Running, huge_pages 2M, restore_backend uffd", src)
	}
	onHugePages := func(in api.Instance) {
		t.Helper()
		verifyGuest(t, m, in.ID)
		if got := hugetlbMiB(t, in.Pid); got < testMemMiB {
			t.Fatalf("%s: %d MiB of its VMM's memory is in 2 MiB pages; want its guest's %d MiB", in.Name, got, testMemMiB)
		}
	}
	onHugePages(src)
	action(t, m, "src", "standby")

	// A File restore is refused, and changes nothing.
	_, err = m.Action(ctx, "src", "restore", api.ActionRequest{RestoreBackend: api.BackendFile})
	if !errors.Is(err, api.ErrInvalid) || !strings.Contains(err.Error(), "uffd") {
		t.Fatalf("file restore of a huge-page VM: %v; want ErrInvalid naming uffd", err)
	}
	if in, _ := m.GetInstance(ctx, "src"); in.State != api.StateStandby || in.Pid != 0 {
		t.Fatalf("after the refused restore: %+v; want Standby with no VMM", in)
	}
	in := action(t, m, "src", "restore")
	if in.RestoreBackend != api.BackendUffd {
		t.Fatalf("default restore of a huge-page VM used %q; want uffd", in.RestoreBackend)
	}
	onHugePages(in)
	action(t, m, "src", "standby")

	// A fork to Running with restore_backend file is refused before any fork exists.
	before, _ := m.ListInstances(ctx)
	_, err = m.ForkInstance(ctx, "src", api.ForkRequest{Name: "nope", TargetState: api.StateRunning, RestoreBackend: api.BackendFile})
	if !errors.Is(err, api.ErrInvalid) {
		t.Fatalf("fork to Running over file of a huge-page VM: %v; want ErrInvalid", err)
	}
	if after, _ := m.ListInstances(ctx); len(after) != len(before) {
		t.Fatalf("the refused fork left %d instances, want %d", len(after), len(before))
	}
	for i := range 3 {
		f := fork(t, m, "src", api.ForkRequest{Name: fmt.Sprintf("f%d", i), TargetState: api.StateRunning})
		if f.HugePages != api.HugePages2M || f.RestoreBackend != api.BackendUffd {
			t.Fatalf("fork %d: %+v; want huge_pages 2M restored via uffd", i, f)
		}
		onHugePages(f)
	}

	// A snapshot keeps the pages; its forks restore on them.
	sn, err := m.CreateSnapshot(ctx, "src", api.SnapshotRequest{Name: "gold"})
	if err != nil || sn.HugePages != api.HugePages2M {
		t.Fatalf("snapshot of a huge-page VM: %+v, %v; want huge_pages 2M", sn, err)
	}
	sf, err := m.ForkSnapshot(ctx, "gold", api.ForkRequest{Name: "sf", TargetState: api.StateRunning})
	if err != nil || sf.HugePages != api.HugePages2M || sf.RestoreBackend != api.BackendUffd {
		t.Fatalf("fork of the snapshot: %+v, %v; want huge_pages 2M via uffd", sf, err)
	}
	onHugePages(sf)
}
