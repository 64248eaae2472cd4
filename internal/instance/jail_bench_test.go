package instance

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// BenchmarkJail prices the jail: create (boot), restore (File) and fork of
// a Standby source (serial, and each fork of a 25-fork burst), unjailed
// (vmm_jailer none) against jailed through forkd jailer with the exec file
// hardlinked into each jail (forkd's way) or copied (the real jailer's),
// all in one run on one XFS loopback. It reports the p50 wall time of an
// operation, and for create and restore the p50 CPU time of the VMM process
// up to the call's return (/proc/PID/schedstat: the jailer and the VMM it
// became, the VMM's start and load) and of the manager's own process
// (getrusage). The machine's wall times are dominated by waiting for a CPU
// under load: compare CPU beside wall, and sub-benchmarks of one run only.
//
//	go test -run '^$' -bench 'Jail$' -benchtime 8x -count 3 ./internal/instance/
func BenchmarkJail(b *testing.B) {
	dir := benchDataDir(b)
	// Each operation jailed right after unjailed, so the two meet the
	// same load.
	for _, op := range []string{"create", "restore", "fork", "fork-burst25"} {
		for _, jailing := range []string{"none", "jailed", "jailed-copied-exec"} {
			b.Run(fmt.Sprintf("jail=%s/op=%s", jailing, op), func(b *testing.B) {
				m := newBenchManager(b, dir, benchSetup{jailing: jailing})
				benchJailOp(b, m, op)
			})
		}
	}
}

// benchVM is the benchmark's guest: 256 MiB, a small paced workload.
var benchVM = api.CreateInstanceRequest{MemoryMiB: 256, BootArgs: "forkd.ws_mib=8 forkd.rate=200"}

func benchJailOp(b *testing.B, m *Manager, op string) {
	ctx := context.Background()
	var wall, vmmCPU, mgrCPU []time.Duration
	var mu sync.Mutex
	timed := func(f func() (api.Instance, error)) api.Instance {
		t0, c0 := time.Now(), selfCPU()
		in, err := f()
		d, c := time.Since(t0), selfCPU()-c0
		if err != nil {
			b.Fatal(err)
		}
		mu.Lock()
		defer mu.Unlock()
		wall = append(wall, d)
		if op == "create" || op == "restore" {
			mgrCPU = append(mgrCPU, c)
			vmmCPU = append(vmmCPU, procCPU(b, in.Pid))
		}
		return in
	}
	var src api.Instance
	if op != "create" {
		req := benchVM
		req.Name = "src"
		var err error
		if src, err = m.CreateInstance(ctx, req); err != nil {
			b.Fatal(err)
		}
		action(b, m, src.ID, "standby")
	}
	syscall.Sync()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		switch op {
		case "create":
			req := benchVM
			req.Name = fmt.Sprintf("c%d", i)
			in := timed(func() (api.Instance, error) { return m.CreateInstance(ctx, req) })
			b.StopTimer()
			m.DeleteInstance(ctx, in.ID)
			b.StartTimer()
		case "restore":
			timed(func() (api.Instance, error) { return m.Action(ctx, src.ID, "restore", api.ActionRequest{}) })
			b.StopTimer()
			action(b, m, src.ID, "standby")
			b.StartTimer()
		case "fork", "fork-burst25":
			n := 1
			if op == "fork-burst25" {
				n = 25
			}
			ids := make([]string, n)
			var wg sync.WaitGroup
			for j := range n {
				wg.Go(func() {
					ids[j] = timed(func() (api.Instance, error) {
						return m.ForkInstance(ctx, src.ID, api.ForkRequest{Name: fmt.Sprintf("f%d-%d", i, j)})
					}).ID
				})
			}
			wg.Wait()
			b.StopTimer()
			for _, id := range ids {
				m.DeleteInstance(ctx, id)
			}
			b.StartTimer()
		}
	}
	b.StopTimer()
	report := func(name string, xs []time.Duration) {
		if len(xs) == 0 {
			return
		}
		slices.Sort(xs)
		b.ReportMetric(float64(xs[len(xs)/2].Microseconds())/1000, name)
	}
	report("p50-ms", wall)
	report("vmm-cpu-p50-ms", vmmCPU)
	report("mgr-cpu-p50-ms", mgrCPU)
}

// procCPU is the CPU time process pid's threads have used, in ns
// (/proc/PID/task/*/schedstat; the thread that execs keeps its time across
// the exec, so a jailed VMM's counts its jailer's main thread too).
func procCPU(b *testing.B, pid int) time.Duration {
	tasks, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	if err != nil {
		b.Fatal(err)
	}
	var sum time.Duration
	for _, t := range tasks {
		raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + t.Name() + "/schedstat")
		if err != nil {
			continue
		}
		if ns, err := strconv.ParseInt(strings.Fields(string(raw))[0], 10, 64); err == nil {
			sum += time.Duration(ns)
		}
	}
	return sum
}

// selfCPU is this process's CPU time so far (user + system).
func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkJailRestorePaired prices the jail on the path its budget names
// (a serial File restore, at most +10 ms), measured in pairs: each
// iteration restores a Standby VM of an unjailed manager and one of a
// jailed manager back to back, in alternating order, so the two meet the
// same load. It reports each side's p50 (wall, and CPU of the VMM process
// up to the call's return) and the p50 of the per-pair differences, which
// load that drifts between pairs cannot move.
//
//	go test -run '^$' -bench 'JailRestorePaired' -benchtime 40x -count 3 ./internal/instance/
func BenchmarkJailRestorePaired(b *testing.B) {
	dir := benchDataDir(b)
	ctx := context.Background()
	sides := []string{"none", "jailed"}
	ms, ids := map[string]*Manager{}, map[string]string{}
	for _, side := range sides {
		m := newBenchManager(b, dir, benchSetup{jailing: side})
		req := benchVM
		req.Name = "src"
		src, err := m.CreateInstance(ctx, req)
		if err != nil {
			b.Fatal(err)
		}
		action(b, m, src.ID, "standby")
		ms[side], ids[side] = m, src.ID
	}
	syscall.Sync()
	wall, cpu := map[string][]time.Duration{}, map[string][]time.Duration{}
	var dWall, dCPU []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		order := sides
		if i%2 == 1 {
			order = []string{sides[1], sides[0]}
		}
		w, c := map[string]time.Duration{}, map[string]time.Duration{}
		for _, side := range order {
			t0 := time.Now()
			in, err := ms[side].Action(ctx, ids[side], "restore", api.ActionRequest{})
			w[side] = time.Since(t0)
			if err != nil {
				b.Fatal(err)
			}
			c[side] = procCPU(b, in.Pid)
			b.StopTimer()
			if _, err := ms[side].Action(ctx, ids[side], "standby", api.ActionRequest{}); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		for _, side := range sides {
			wall[side], cpu[side] = append(wall[side], w[side]), append(cpu[side], c[side])
		}
		dWall, dCPU = append(dWall, w["jailed"]-w["none"]), append(dCPU, c["jailed"]-c["none"])
	}
	b.StopTimer()
	p50 := func(xs []time.Duration) float64 {
		xs = slices.Clone(xs)
		slices.Sort(xs)
		return float64(xs[len(xs)/2].Microseconds()) / 1000
	}
	for _, side := range sides {
		b.ReportMetric(p50(wall[side]), side+"-p50-ms")
		b.ReportMetric(p50(cpu[side]), side+"-vmm-cpu-p50-ms")
	}
	b.ReportMetric(p50(dWall), "added-p50-ms")
	b.ReportMetric(p50(dCPU), "added-vmm-cpu-p50-ms")
}
