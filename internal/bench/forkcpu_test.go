package bench

import (
	"os"
	"testing"
	"time"
)

// spin burns CPU until this process's CPU time, as ReadSchedTimes reads
// it, has grown by at least d; it fails the test after a minute without.
func spin(t *testing.T, d time.Duration) {
	t.Helper()
	start, err := ReadSchedTimes(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	x := 1
	for deadline := time.Now().Add(time.Minute); ; {
		for i := range 1 << 18 {
			x = x*31 + i
		}
		now, err := ReadSchedTimes(os.Getpid())
		if err != nil {
			t.Fatal(err)
		}
		if now.CPU-start.CPU >= d && x != 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("a minute of busy work and the CPU time grew %v, want %v", now.CPU-start.CPU, d)
		}
	}
}

func TestCPUMeterDividesTheCPUOfItsIntervalsByTheirForks(t *testing.T) {
	// This process stands in for the daemon: both sides see the spin.
	m := newCPUMeter(os.Getpid())
	m.start()
	spin(t, 20*time.Millisecond)
	m.stop(2)
	time.Sleep(20 * time.Millisecond) // between intervals: not counted
	m.start()
	spin(t, 20*time.Millisecond)
	m.stop(2)
	c := m.perFork()
	if c == nil {
		t.Fatal("no CPU per fork for a process that exists")
	}
	// 40 ms or more over 4 forks: at least 10 ms each, on either side.
	if c.Daemon < 10*time.Millisecond || c.Client < 10*time.Millisecond {
		t.Fatalf("CPU per fork %+v, want at least 10ms on each side", c)
	}
	if c.Daemon > time.Second {
		t.Fatalf("CPU per fork %+v: far more than was spent", c)
	}
}

func TestCPUMeterWithoutADaemonMeasuresNothing(t *testing.T) {
	for name, pid := range map[string]int{"unknown pid": 0, "gone": 1 << 30} {
		m := newCPUMeter(pid)
		m.start()
		m.stop(1)
		if c := m.perFork(); c != nil {
			t.Errorf("%s: CPU per fork %+v, want none", name, c)
		}
	}
	if c := newCPUMeter(os.Getpid()).perFork(); c != nil {
		t.Errorf("no interval: CPU per fork %+v, want none", c)
	}
}

func TestBurstFloorIsHalfTheForksCPUOverTheCPUs(t *testing.T) {
	c := &ForkCPU{Daemon: 800 * time.Microsecond, Client: 200 * time.Microsecond}
	for _, tc := range []struct {
		n, cpus int
		want    time.Duration
	}{
		{25, 2, 6500 * time.Microsecond}, // the 13th fork
		{24, 2, 6 * time.Millisecond},
		{1, 2, 500 * time.Microsecond},
		{25, 0, 13 * time.Millisecond}, // unknown CPUs: one
	} {
		if got := c.BurstFloor(tc.n, tc.cpus); got != tc.want {
			t.Errorf("BurstFloor(%d, %d) = %v, want %v", tc.n, tc.cpus, got, tc.want)
		}
	}
}
