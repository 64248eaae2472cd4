package doctor

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/testenv"
)

// On this host every check answers, and says what forkd does without what
// is missing; what the test environment guarantees (userfaultfd, TAP and
// nf_tables under FORKD_TEST_REQUIRE) is found.
func TestDoctorReportsEveryCheckOnThisHost(t *testing.T) {
	testenv.NeedRoot(t)
	rs := Run(context.Background(), Options{DataDir: filepath.Join(t.TempDir(), "data")})
	want := []string{"kvm", "firecracker", "jail", "userfaultfd", "data dir", "reflink", "tun", "nf_tables", "cgroups", "memory", "huge pages", "disk"}
	if len(rs) != len(want) {
		t.Fatalf("%d checks, want %d: %+v", len(rs), len(want), rs)
	}
	for i, r := range rs {
		if r.Check != want[i] || r.Found == "" {
			t.Errorf("check %d: %+v; want %q with what was found", i, r, want[i])
		}
		if (r.Status == OK) != (r.Without == "") {
			t.Errorf("%s: status %s but without %q: only a missing thing says what forkd does without it", r.Check, r.Status, r.Without)
		}
		t.Logf("%-12s %-8s %s | %s", r.Check, r.Status, r.Found, r.Without)
	}
	byName := map[string]Result{}
	for _, r := range rs {
		byName[r.Check] = r
	}
	for key, check := range map[string]string{testenv.Uffd: "userfaultfd", testenv.Netns: "tun"} {
		if testenv.Required(key) && byName[check].Status != OK {
			t.Errorf("%s is required here but doctor says %+v", key, byName[check])
		}
	}
	if Failed(rs) {
		t.Errorf("a fresh data dir under a private temp dir fails: %+v", rs)
	}
}

// The twin: where the devices are missing, each check says so and what
// forkd does without them, and an unsafe data dir fails the preflight.
func TestDoctorSaysWhatForkdDoesWithoutEachThing(t *testing.T) {
	testenv.NeedRoot(t)
	none := filepath.Join(t.TempDir(), "none")
	mountinfo := filepath.Join(t.TempDir(), "mountinfo")
	v2 := t.TempDir()
	os.WriteFile(filepath.Join(v2, "cgroup.controllers"), []byte("hugetlb\n"), 0o644)
	os.WriteFile(mountinfo, []byte("31 23 0:28 / "+v2+" rw - cgroup2 cgroup2 rw\n"), 0o644)
	unsafe := t.TempDir()
	os.Chmod(unsafe, 0o777)
	rs := Run(context.Background(), Options{
		DataDir:  unsafe,
		Paths:    Paths{KVM: none, Tun: none, Userfaultfd: none, Mountinfo: mountinfo, Meminfo: "/proc/meminfo"},
		LookPath: func(string) (string, error) { return "", errors.New("not found") },
	})
	want := map[string]string{
		"kvm": "built-in emulator", "firecracker": "built-in emulator", "tun": "no network",
		"cgroups": "cannot be capped",
	}
	for _, r := range rs {
		if w, ok := want[r.Check]; ok {
			if r.Status != Missing || !strings.Contains(r.Without, w) {
				t.Errorf("%s: %+v; want missing, saying %q", r.Check, r, w)
			}
			delete(want, r.Check)
		}
		if r.Check == "data dir" && r.Status != Fail {
			t.Errorf("a world-writable data dir: %+v; want fail", r)
		}
	}
	if len(want) != 0 {
		t.Errorf("checks not run: %v", want)
	}
	if !Failed(rs) {
		t.Error("Failed() is false with an unsafe data dir")
	}
}

// The cgroup check reads the mount table as the jail does: the hybrid
// layout of this project's machines (memory, cpu and pids in v1, the v2
// hierarchy holding only hugetlb), a v2 hierarchy that holds them all, and
// mount points the kernel writes with octal escapes (\040 for a space).
// It holds a host to the jail's rule too: every controller from one
// version, which a host with pids in v1 only and the rest in v2 fails.
func TestCgroupCheckReadsTheMountTableAsTheJailDoes(t *testing.T) {
	dir := t.TempDir()
	hugetlb, all, nopids := filepath.Join(dir, "v2"), filepath.Join(dir, "v2 all"), filepath.Join(dir, "v2 no pids")
	for d, controllers := range map[string]string{hugetlb: "hugetlb", all: "cpuset cpu io memory hugetlb pids", nopids: "cpu memory"} {
		os.Mkdir(d, 0o755)
		os.WriteFile(filepath.Join(d, "cgroup.controllers"), []byte(controllers+"\n"), 0o644)
	}
	esc := strings.NewReplacer(" ", `\040`).Replace
	v1 := func(id, point, controller string) string {
		return id + " 31 0:" + id + " / " + esc(point) + " rw,nosuid,relatime shared:" + id + " - cgroup cgroup rw," + controller
	}
	v2 := func(point string) string {
		return "41 31 0:38 / " + esc(point) + " rw,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate"
	}
	base := "31 23 0:28 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755"
	for _, tc := range []struct {
		name   string
		table  []string
		status string
		found  string
	}{
		{"hybrid", []string{base, v1("32", "/sys/fs/cgroup/cpu", "cpu"), v1("35", "/sys/fs/cgroup/memory", "memory"),
			v1("39", "/sys/fs/cgroup/pids", "pids"), v2(hugetlb)},
			OK, "memory (v1 at /sys/fs/cgroup/memory), cpu (v1 at /sys/fs/cgroup/cpu), pids (v1 at /sys/fs/cgroup/pids)"},
		{"v2 at a path with a space", []string{base, v2(all)},
			OK, "memory (v2 at " + all + "), cpu (v2 at " + all + "), pids (v2 at " + all + ")"},
		{"v1 at paths with spaces", []string{base, v1("32", "/sys/fs/cgroup/c pu", "cpu"), v1("35", "/sys/fs/cgroup/mem ory", "memory"),
			v1("39", "/sys/fs/cgroup/pi ds", "pids")},
			OK, "memory (v1 at /sys/fs/cgroup/mem ory), cpu (v1 at /sys/fs/cgroup/c pu), pids (v1 at /sys/fs/cgroup/pi ds)"},
		{"v2 with hugetlb only", []string{base, v2(hugetlb)}, Missing, "no memory, cpu, pids"},
		// Each controller somewhere, but no one version with all three:
		// the jail (jail.Mounts.Version) refuses this host, so must doctor.
		{"memory and cpu in v2, pids in v1 only", []string{base, v1("39", "/sys/fs/cgroup/pids", "pids"), v2(nopids)},
			Missing, "no one cgroup version offers them all"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mi := filepath.Join(t.TempDir(), "mountinfo")
			os.WriteFile(mi, []byte(strings.Join(tc.table, "\n")+"\n"), 0o644)
			r := checkCgroups(mi, true)
			if r.Status != tc.status || !strings.Contains(r.Found, tc.found) {
				t.Errorf("checkCgroups = %+v; want %s, found %q", r, tc.status, tc.found)
			}
		})
	}
}

// A firecracker forkd cannot drive (older than 1.10, or 2.x) is not "ok":
// every launch would refuse it. A supported release is the twin.
func TestDoctorHoldsFirecrackerToTheReleasesForkdDrives(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		version string
		ok      bool
	}{
		{"v1.9.1", false}, {"v2.0.0", false}, {"v1.10.1", true}, {"v1.16.1", true},
	} {
		bin := filepath.Join(dir, "firecracker-"+tc.version)
		script := "#!/bin/sh\necho 'Firecracker " + tc.version + "'\necho\necho 'Supported snapshot data format versions: 4.0.0'\n"
		if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		r := checkFirecracker(context.Background(), func(string) (string, error) { return bin, nil })
		switch {
		case tc.ok && (r.Status != OK || !strings.Contains(r.Found, "a release forkd drives")):
			t.Errorf("firecracker %s: %+v; want ok, a release forkd drives", tc.version, r)
		case !tc.ok && (r.Status != Fail || !strings.Contains(r.Without, "install Firecracker 1.10")):
			t.Errorf("firecracker %s: %+v; want fail, saying which releases to install", tc.version, r)
		}
	}
}

// A jailed daemon needs root and the cpu, memory and pids controllers, or
// serve refuses to start: doctor fails then, and says what to do. An
// unconfined one is only a warning. A usable jailer is the twin.
func TestDoctorChecksWhatTheJailNeeds(t *testing.T) {
	cgOK := Result{Check: "cgroups", Status: OK, Found: "memory (v1), cpu (v1), pids (v1)"}
	cgNo := Result{Check: "cgroups", Status: Missing, Found: "have memory (v1); no cpu, pids"}
	jailer := []string{"/usr/bin/forkd", "jailer"}
	for _, tc := range []struct {
		name   string
		j      Jail
		root   bool
		cg     Result
		status string
		says   string
	}{
		{"usable", Jail{Setting: "auto", Cmd: jailer}, true, cgOK, OK, "own uid"},
		{"none", Jail{Setting: "none"}, true, cgOK, Missing, "unconfined"},
		{"unresolved", Jail{Setting: "auto", Err: errors.New("vmm_jailer auto: no jailer beside /usr/bin/firecracker")}, true, cgOK, Fail, "refuses to start"},
		{"not root", Jail{Setting: "auto", Cmd: jailer}, false, cgOK, Fail, "run it as root"},
		{"no controllers", Jail{Setting: "auto", Cmd: jailer}, true, cgNo, Fail, "mount them"},
	} {
		r := checkJail(context.Background(), tc.j, tc.root, tc.cg)
		if r.Status != tc.status || !strings.Contains(r.Found+r.Without, tc.says) {
			t.Errorf("%s: %+v; want %s, saying %q", tc.name, r, tc.status, tc.says)
		}
	}
}

// The pool of 2 MiB pages: a pool says its size, an empty one (or one that
// cannot be read) what forkd does without it.
func TestDoctorReportsThePoolOfHugePages(t *testing.T) {
	pool := func(total, free int64, err error) func() (int64, int64, error) {
		return func() (int64, int64, error) { return total, free, err }
	}
	if r := checkHugePages(pool(512, 100, nil)); r.Status != OK || !strings.Contains(r.Found, "512 pages") || !strings.Contains(r.Found, "100 free") {
		t.Errorf("a pool of 512: %+v", r)
	}
	for _, p := range []func() (int64, int64, error){pool(0, 0, nil), pool(0, 0, errors.New("no sysfs"))} {
		if r := checkHugePages(p); r.Status != Missing || !strings.Contains(r.Without, "vm.nr_hugepages") {
			t.Errorf("no pool: %+v; want missing, naming vm.nr_hugepages", r)
		}
	}
}
