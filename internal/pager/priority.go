package pager

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// pagerNice is the CPU priority the pager runs at: above every guest.
//
// The pager is on the critical path of every VM it serves: a vCPU whose
// page is missing waits for it, and nothing else on the host can serve it.
// Guests that already have their pages, meanwhile, keep every CPU they are
// given busy (an unpaced workload, or any real vCPU). At the default
// weight the pager gets a slice among them, and Go turns a slice into a
// stall: a stop-the-world (every GC cycle) waits for the thread of every
// P, so one pager thread left on a run queue parks all the others in
// futex, with faults read and not served. A burst of 25 restores of a
// guest of 2 MiB pages on 2 CPUs took 35-67 s to reach its working set
// that way (faults held for over 1 s, pager idle, VMMs too starved to
// answer their API); at this priority it takes about 2 s. The pager's own
// work is bounded by the faults and replays it is asked for, so it cannot
// take the CPUs from the guests for longer than they wait on it anyway.
const pagerNice = -20

// raisePriority puts the whole pager process at pagerNice: its autogroup
// (the kernel weighs a session against other sessions and cgroups by its
// autogroup's nice, not its threads'; the pager runs in a session of its
// own, see EnsureRunning) and every thread (what counts without
// autogroups; threads made later inherit the nice of the thread that makes
// them). It needs CAP_SYS_NICE; without it the pager runs at the default
// priority and the caller says so.
func raisePriority() error {
	var errs []error
	err := os.WriteFile("/proc/self/autogroup", []byte(strconv.Itoa(pagerNice)), 0)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("autogroup: %w", err))
	}
	// Twice: a thread the runtime starts during the first pass may have
	// been made by a thread not yet raised.
	for range 2 {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return errors.Join(append(errs, err)...)
		}
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			if err := unix.Setpriority(unix.PRIO_PROCESS, tid, pagerNice); err != nil && !errors.Is(err, unix.ESRCH) {
				return errors.Join(append(errs, fmt.Errorf("thread %d: %w", tid, err))...)
			}
		}
	}
	return errors.Join(errs...)
}
