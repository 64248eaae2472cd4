package bench

import (
	"os"
	"time"
)

// ForkCPU is what fork calls cost in CPU time (user and kernel, every
// thread), per fork: the daemon's, and this benchmark's own as their
// client. On a host with few CPUs it bounds a burst: the forks of a burst
// cannot all have returned before their CPU time, spread over every CPU,
// has passed.
type ForkCPU struct {
	Daemon time.Duration `json:"daemon_ns"`
	Client time.Duration `json:"client_ns"`
	// DaemonWait is the daemon's threads' time runnable but waiting for a
	// CPU, per fork: on a loaded host, the part of a fork's latency spent
	// queueing for a CPU rather than working.
	DaemonWait time.Duration `json:"daemon_wait_ns"`
}

// Total is the daemon's and the client's CPU per fork.
func (c *ForkCPU) Total() time.Duration { return c.Daemon + c.Client }

// BurstFloor is the earliest the median fork of a burst of n can return
// on cpus CPUs at this CPU cost per fork: even with the forks finished in
// the order they came, the first half of them need half the burst's CPU
// time, shared by every CPU.
func (c *ForkCPU) BurstFloor(n, cpus int) time.Duration {
	if cpus < 1 {
		cpus = 1
	}
	return time.Duration((n+1)/2) * c.Total() / time.Duration(cpus)
}

// cpuMeter sums the daemon's and this process's CPU time over the
// intervals between start and stop, and counts the forks made in them.
type cpuMeter struct {
	pid            int
	daemon, client SchedTimes // summed over finished intervals
	d0, c0         SchedTimes // at the current interval's start
	forks          int
	ok             bool // a daemon pid, and every read so far succeeded
}

// newCPUMeter meters the daemon of pid (0: unknown, nothing is measured).
func newCPUMeter(pid int) *cpuMeter { return &cpuMeter{pid: pid, ok: pid > 0} }

// start begins an interval. This process's own reading of the daemon's
// counters is kept out of its interval: it is read after them here, and
// before them in stop.
func (m *cpuMeter) start() {
	if !m.ok {
		return
	}
	var err1, err2 error
	m.d0, err1 = ReadSchedTimes(m.pid)
	m.c0, err2 = ReadSchedTimes(os.Getpid())
	m.ok = err1 == nil && err2 == nil
}

// stop ends the interval begun by start, in which forks forks were made.
func (m *cpuMeter) stop(forks int) {
	if !m.ok {
		return
	}
	c1, err2 := ReadSchedTimes(os.Getpid())
	d1, err1 := ReadSchedTimes(m.pid)
	if m.ok = err1 == nil && err2 == nil; !m.ok {
		return
	}
	m.daemon.CPU += d1.CPU - m.d0.CPU
	m.daemon.RunQueueWait += d1.RunQueueWait - m.d0.RunQueueWait
	m.client.CPU += c1.CPU - m.c0.CPU
	m.forks += forks
}

// perFork is the CPU per fork over every interval, nil when unknown.
func (m *cpuMeter) perFork() *ForkCPU {
	if !m.ok || m.forks == 0 {
		return nil
	}
	n := time.Duration(m.forks)
	return &ForkCPU{Daemon: m.daemon.CPU / n, Client: m.client.CPU / n, DaemonWait: m.daemon.RunQueueWait / n}
}
