package pager

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/testenv"
)

// defaultPriorityEnv makes the test binary's `pager serve` keep the default
// CPU priority (MainOptions.DefaultPriority), for the twin below.
const defaultPriorityEnv = "FORKD_PAGER_TEST_DEFAULT_PRIORITY"

// TestPagerOutranksTheGuestsForCPU: a pager started as the manager starts
// it (EnsureRunning: `pager serve`, a session of its own) runs its
// autogroup and every thread at pagerNice, so guests that keep the CPUs
// busy cannot starve it while other guests wait on it for their pages
// (docs/architecture.md §8). The twin starts it with the raise switched
// off and shows the check sees the default priority.
func TestPagerOutranksTheGuestsForCPU(t *testing.T) {
	testenv.NeedRoot(t)
	for _, tc := range []struct {
		name string
		keep bool
		want int
	}{
		{"raised", false, pagerNice},
		{"twin: left at the default priority", true, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.keep {
				t.Setenv(defaultPriorityEnv, "1")
			}
			c, err := ensurePager(t, shortTempDir(t), "v1")
			if err != nil {
				t.Fatal(err)
			}
			defer stopPager(t, c)
			h, err := c.Health(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			threads, group, err := processNice(h.Pid)
			if err != nil {
				t.Fatal(err)
			}
			for tid, n := range threads {
				if n != tc.want {
					t.Errorf("pager thread %d runs at nice %d, want %d", tid, n, tc.want)
				}
			}
			if group != nil && *group != tc.want {
				t.Errorf("pager's autogroup runs at nice %d, want %d", *group, tc.want)
			}
			if len(threads) < 2 {
				t.Errorf("pager has %d threads, want a Go runtime's several", len(threads))
			}
		})
	}
}

// processNice reads the nice of every thread of pid, and of its autogroup
// (nil when the kernel has no autogroups).
func processNice(pid int) (threads map[int]int, group *int, err error) {
	dir := fmt.Sprintf("/proc/%d", pid)
	tasks, err := os.ReadDir(filepath.Join(dir, "task"))
	if err != nil {
		return nil, nil, err
	}
	threads = make(map[int]int)
	for _, task := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, "task", task.Name(), "stat"))
		if err != nil {
			continue // the thread ended
		}
		// Fields after the command (which may hold spaces): state is the
		// 3rd field of stat, nice the 19th.
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		n, err := strconv.Atoi(f[19-3])
		if err != nil {
			return nil, nil, fmt.Errorf("thread %s stat: %w", task.Name(), err)
		}
		tid, _ := strconv.Atoi(task.Name())
		threads[tid] = n
	}
	b, err := os.ReadFile(filepath.Join(dir, "autogroup"))
	if err != nil {
		return threads, nil, nil
	}
	// "/autogroup-123 nice -20"
	f := strings.Fields(string(b))
	if len(f) != 3 || f[1] != "nice" {
		return nil, nil, fmt.Errorf("%s/autogroup: %q", dir, b)
	}
	n, err := strconv.Atoi(f[2])
	if err != nil {
		return nil, nil, fmt.Errorf("%s/autogroup: %w", dir, err)
	}
	return threads, &n, nil
}
