package testenv

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

func TestHugePagesGrowsThePoolForTheTestOnly(t *testing.T) {
	NeedRoot(t)
	before, err := readHugePages()
	if err != nil {
		Need(t, Huge, err.Error())
	}
	t.Run("holder", func(t *testing.T) {
		HugePages(t, 3)
		if got, err := readHugePages(); err != nil || got != before+3 {
			t.Fatalf("pool during the test = %d, %v; want %d", got, err, before+3)
		}
	})
	if got, err := readHugePages(); err != nil || got != before {
		t.Fatalf("pool after the test = %d, %v; want %d back", got, err, before)
	}
}

// envHugeHolder makes this test binary, before any test, a holder of 2
// huge pages that waits to be killed
// (TestHugePagesOfAKilledTestAreGivenBack).
const envHugeHolder = "FORKD_TEST_HUGE_HOLDER"

func init() {
	if os.Getenv(envHugeHolder) == "" {
		return
	}
	if _, err := growHugePages(2); err != nil {
		fmt.Println("no pages:", err)
		os.Exit(1)
	}
	fmt.Println("holding")
	time.Sleep(time.Minute)
	os.Exit(1)
}

// TestHugePagesOfAKilledTestAreGivenBack: a test binary killed (as
// -timeout kills one) runs no cleanup; the next use of the pool gives its
// pages back. Other test binaries may grow and shrink the pool meanwhile,
// so the test reads it under the pool's lock. Twin: without
// reclaimHugePages the holder's 2 pages stay taken.
func TestHugePagesOfAKilledTestAreGivenBack(t *testing.T) {
	NeedRoot(t)
	if _, err := readHugePages(); err != nil {
		Need(t, Huge, err.Error())
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envHugeHolder+"=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var line string
	if sc := bufio.NewScanner(out); sc.Scan() {
		line = sc.Text()
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	if line != "holding" {
		Need(t, Huge, "the holder: "+line)
	}
	entry := filepath.Join(hugePagesLedger, fmt.Sprintf("%d-1", cmd.Process.Pid))
	if b, err := os.ReadFile(entry); err != nil || string(b) != "2" {
		t.Fatalf("the killed holder's ledger entry: %q, %v; want its 2 pages", b, err)
	}
	// What the next grant or give-back does first, under the lock.
	unlock, err := lockPool()
	if err != nil {
		t.Fatal(err)
	}
	before, err := readHugePages()
	if err == nil {
		err = reclaimHugePages()
	}
	after, _ := readHugePages()
	unlock()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(entry); before-after != 2 || !os.IsNotExist(err) {
		// The twin's leak, undone: the holder's pages and its entry.
		_ = withPool(func(pool int) error {
			_ = os.Remove(entry)
			return setHugePages(max(pool-2, 0))
		})
		t.Fatalf("the next use of the pool took it from %d to %d pages, entry %v; want the killed holder's 2 pages back and its entry gone", before, after, err)
	}
}
