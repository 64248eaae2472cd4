package capacity

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
)

func fakeHost(memTotal, diskFree int64) Host {
	return Host{
		MemTotal: func() (int64, error) { return memTotal, nil },
		DiskFree: func(string) (int64, error) { return diskFree, nil },
		// A pool of 256 pages (512 MiB), 10 of them free.
		HugePages: func() (int64, int64, error) { return 256, 10, nil },
	}
}

const gib = int64(1) << 30

// Finding: `memory_mib: 65536, vcpus: 32` on a 24 GiB machine got 201 in
// 0.7 s and its standby brought the host-wide OOM killer four minutes later.
// Each row is a refusal with its resource and shortfall, beside its twin:
// the largest request that fits.
func TestReserveRefusesWhatTheHostCannotHold(t *testing.T) {
	host := fakeHost(24*gib, 100*gib)
	// 170 GiB run of MemTotal 24 GiB × 8 = 192 GiB: 22 GiB are left.
	running := []Running{{ID: "a", MemoryMiB: 64 << 10}, {ID: "b", MemoryMiB: 64 << 10}, {ID: "c", MemoryMiB: 42 << 10}}
	for _, tc := range []struct {
		name    string
		limits  Limits
		req     Request
		refused string // the resource, "" = admitted
		says    string
	}{
		{"64 GiB on a 24 GiB host", Limits{}, Request{ID: "x", MemoryMiB: 64 << 10, Vcpus: 32}, "memory", "by 40960 MiB"},
		{"24 GiB on a 24 GiB host (the twin)", Limits{}, Request{ID: "x", MemoryMiB: 24 << 10}, "", ""},
		{"over max_vm_memory_ratio 0.5", Limits{MaxVMMemoryRatio: 0.5}, Request{ID: "x", MemoryMiB: 13 << 10}, "memory", "by 1024 MiB"},
		{"over max_memory_mib", Limits{MaxMemoryMiB: 4096}, Request{ID: "x", MemoryMiB: 4097}, "memory", "max_memory_mib 4096 by 1 MiB"},
		{"at max_memory_mib (the twin)", Limits{MaxMemoryMiB: 4096}, Request{ID: "x", MemoryMiB: 4096}, "", ""},
		{"over max_vcpus", Limits{MaxVcpus: 4}, Request{ID: "x", MemoryMiB: 256, Vcpus: 6}, "vcpus", "by 2"},
		{"running RAM over MemTotal × 8", Limits{}, Request{ID: "x", MemoryMiB: 22<<10 + 1, Runs: true}, "memory", "by 1 MiB"},
		{"running RAM at MemTotal × 8 (the twin)", Limits{}, Request{ID: "x", MemoryMiB: 22 << 10, Runs: true}, "", ""},
		{"not running: no overcommit check", Limits{}, Request{ID: "x", MemoryMiB: 24 << 10}, "", ""},
		{"a VM restarting is not counted twice", Limits{MaxVMMemoryRatio: 8}, Request{ID: "c", MemoryMiB: 42 << 10, Runs: true}, "", ""},
		{"max_running_vms", Limits{MaxRunningVMs: 3}, Request{ID: "x", MemoryMiB: 256, Runs: true}, "running VMs", "1 over"},
		{"disk short", Limits{}, Request{ID: "x", MemoryMiB: 256, DiskBytes: 100 * gib}, "disk", "64 MiB short"},
		{"disk enough (the twin)", Limits{}, Request{ID: "x", MemoryMiB: 256, DiskBytes: 100*gib - DiskReserve}, "", ""},
		{"huge pages over the whole pool", Limits{}, Request{ID: "x", MemoryMiB: 514, Runs: true, HugePages: true}, "huge pages", "vm.nr_hugepages to at least 257"},
		{"huge pages: the whole pool (the twin)", Limits{}, Request{ID: "x", MemoryMiB: 512, Runs: true, HugePages: true}, "", ""},
		{"huge pages: not running, no pool check", Limits{}, Request{ID: "x", MemoryMiB: 514, HugePages: true}, "", ""},
		{"huge pages: a boot needs all its pages free", Limits{}, Request{ID: "x", MemoryMiB: 22, Runs: true, HugePages: true, Boots: true}, "huge pages", "1 short"},
		{"huge pages: a boot that fits the free pages (the twin)", Limits{}, Request{ID: "x", MemoryMiB: 20, Runs: true, HugePages: true, Boots: true}, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := New(tc.limits, host, "/data")
			if err != nil {
				t.Fatal(err)
			}
			release, err := a.Reserve(tc.req, func() ([]Running, error) { return running, nil })
			if tc.refused == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				release()
				return
			}
			var e *Error
			if !errors.As(err, &e) || !errors.Is(err, ErrInsufficient) || e.Resource != tc.refused || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("Admit: %v; want a refusal of %s saying %q", err, tc.refused, tc.says)
			}
		})
	}
}

// What is admitted is held until released: two requests cannot both take
// the last of the memory, the last running slot or the last free disk.
func TestReservationsHoldUntilReleased(t *testing.T) {
	a, err := New(Limits{MemoryOvercommit: 1, MaxRunningVMs: 10}, fakeHost(4*gib, 2*gib), "/data")
	if err != nil {
		t.Fatal(err)
	}
	none := func() ([]Running, error) { return nil, nil }
	first, err := a.Reserve(Request{ID: "x", MemoryMiB: 3 << 10, Runs: true, DiskBytes: gib}, none)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Reserve(Request{ID: "y", MemoryMiB: 2 << 10, Runs: true}, none); !errors.Is(err, ErrInsufficient) {
		t.Errorf("second request while the first holds 3 of 4 GiB: %v; want refused", err)
	}
	if _, err := a.Reserve(Request{ID: "z", MemoryMiB: 256, DiskBytes: gib}, none); !errors.Is(err, ErrInsufficient) {
		t.Errorf("second request while the first holds 1 of 2 GiB of disk: %v; want refused", err)
	}
	// The first one's VM now runs: its record says so and its reservation
	// goes; the same memory is still counted, once.
	first()
	first() // release is idempotent
	running := func() ([]Running, error) { return []Running{{ID: "x", MemoryMiB: 3 << 10}}, nil }
	if _, err := a.Reserve(Request{ID: "y", MemoryMiB: 2 << 10, Runs: true}, running); !errors.Is(err, ErrInsufficient) {
		t.Errorf("after the first VM runs: %v; want still refused", err)
	}
	if r, err := a.Reserve(Request{ID: "y", MemoryMiB: 1 << 10, Runs: true}, running); err != nil {
		t.Errorf("1 GiB beside a running 3 GiB on 4 GiB: %v", err)
	} else {
		r()
	}
	if r, err := a.Reserve(Request{ID: "z", MemoryMiB: 256, DiskBytes: gib}, running); err != nil {
		t.Errorf("disk after the release: %v", err)
	} else {
		r()
	}
}

func TestRealHostReadsThisMachine(t *testing.T) {
	h := RealHost()
	total, err := h.MemTotal()
	if err != nil || total < 64<<20 {
		t.Errorf("MemTotal = %d, %v", total, err)
	}
	// sysinfo's total RAM is /proc/meminfo's MemTotal, which the limits
	// and their messages name.
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	var kb int64
	for _, line := range strings.Split(string(b), "\n") {
		if _, err := fmt.Sscanf(line, "MemTotal: %d kB", &kb); err == nil {
			break
		}
	}
	if kb<<10 != total {
		t.Errorf("MemTotal = %d bytes, /proc/meminfo says %d kB (%d bytes)", total, kb, kb<<10)
	}
	free, err := h.DiskFree(t.TempDir())
	if err != nil || free <= 0 {
		t.Errorf("DiskFree = %d, %v", free, err)
	}
	pool, poolFree, err := h.HugePages()
	if err != nil || pool < 0 || poolFree < 0 || poolFree > pool {
		t.Errorf("HugePages = %d total, %d free, %v", pool, poolFree, err)
	}
}

// A pool with no page free refuses a VM backed by huge pages, and only such
// a VM.
func TestAnEmptyHugePagePoolRefusesHugePageVMs(t *testing.T) {
	h := fakeHost(24*gib, 100*gib)
	h.HugePages = func() (int64, int64, error) { return 256, 0, nil }
	a, err := New(Limits{}, h, "/data")
	if err != nil {
		t.Fatal(err)
	}
	none := func() ([]Running, error) { return nil, nil }
	_, err = a.Reserve(Request{ID: "x", MemoryMiB: 64, Runs: true, HugePages: true}, none)
	var e *Error
	if !errors.As(err, &e) || e.Resource != "huge pages" || !strings.Contains(err.Error(), "none free") {
		t.Fatalf("Reserve with no free page: %v; want a huge pages refusal saying none is free", err)
	}
	release, err := a.Reserve(Request{ID: "y", MemoryMiB: 64, Runs: true}, none)
	if err != nil {
		t.Fatalf("a VM of 4 KiB pages was refused: %v", err)
	}
	release()
}

// Boots in flight hold their pages: with 10 free, a boot of 6 pages leaves
// room for a restore but not for a second boot of 5, until it is released.
func TestHugePageBootsInFlightHoldTheirPages(t *testing.T) {
	a, err := New(Limits{}, fakeHost(24*gib, 100*gib), "/data")
	if err != nil {
		t.Fatal(err)
	}
	none := func() ([]Running, error) { return nil, nil }
	boot := func(id string, mib int) Request {
		return Request{ID: id, MemoryMiB: mib, Runs: true, HugePages: true, Boots: true}
	}
	release, err := a.Reserve(boot("a", 12), none)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Reserve(boot("b", 10), none); !errors.Is(err, ErrInsufficient) || !strings.Contains(err.Error(), "6 more are held") {
		t.Fatalf("a second boot past the free pages: %v; want a refusal counting the boot in flight", err)
	}
	if r, err := a.Reserve(Request{ID: "c", MemoryMiB: 64, Runs: true, HugePages: true}, none); err != nil {
		t.Fatalf("a restore with pages free: %v", err)
	} else {
		r()
	}
	release()
	r, err := a.Reserve(boot("b", 10), none)
	if err != nil {
		t.Fatalf("the second boot once the first is released: %v", err)
	}
	r()
}

// Finding: a batch of 2 forks to Running under max_running_vms 2 was
// refused at its second fork's restore: the first fork, admitted by the
// batch and reserved again by its own restore, counted as two running
// VMs. A VM holding two reservations counts once; a second VM still
// counts (the twin).
func TestAVMReservedTwiceCountsOnce(t *testing.T) {
	a, err := New(Limits{MaxRunningVMs: 2, MemoryOvercommit: 1}, fakeHost(4*gib, 100*gib), "/data")
	if err != nil {
		t.Fatal(err)
	}
	none := func() ([]Running, error) { return nil, nil }
	for _, req := range []Request{
		{ID: "a", MemoryMiB: 1 << 10, Runs: true}, // a's admission
		{ID: "b", MemoryMiB: 1 << 10, Runs: true}, // b's admission
		{ID: "a", MemoryMiB: 1 << 10, Runs: true}, // a's restore
	} {
		if _, err := a.Reserve(req, none); err != nil {
			t.Fatalf("reserve %s: %v", req.ID, err)
		}
	}
	if _, err := a.Reserve(Request{ID: "b", MemoryMiB: 2 << 10, Runs: true}, none); err != nil {
		t.Errorf("b's restore beside a, reserved twice, within max_running_vms 2 and 4 GiB: %v", err)
	}
	if _, err := a.Reserve(Request{ID: "c", MemoryMiB: 256, Runs: true}, none); !errors.Is(err, ErrInsufficient) || !strings.Contains(err.Error(), "max_running_vms is 2") {
		t.Errorf("a third VM beside a and b under max_running_vms 2: %v; want refused", err)
	}
}
