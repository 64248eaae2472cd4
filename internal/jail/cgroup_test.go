package jail

import (
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// hybridMounts is this project's machines' layout: v1 controllers, and a
// cgroup2 mount holding only hugetlb (mountinfo's format, as the kernel
// writes it: optional fields, then "-", then the type).
const hybridMounts = `30 22 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
32 30 0:28 / /sys/fs/cgroup/cpu rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,cpu
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,memory
39 30 0:35 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,pids
40 30 0:36 / /sys/fs/cgroup/cpu\040acct rw,relatime shared:18 - cgroup cgroup rw,cpuacct
41 30 0:37 / UNIFIED rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
`

func writeMounts(t *testing.T, unifiedControllers string) Mounts {
	t.Helper()
	dir := t.TempDir()
	unified := filepath.Join(dir, "uni fied") // written \040 in the table
	os.MkdirAll(unified, 0o755)
	os.WriteFile(filepath.Join(unified, "cgroup.controllers"), []byte(unifiedControllers+"\n"), 0o644)
	p := filepath.Join(dir, "mountinfo")
	table := strings.Replace(hybridMounts, "UNIFIED", strings.ReplaceAll(unified, " ", `\040`), 1)
	os.WriteFile(p, []byte(table), 0o644)
	m, err := ReadMounts(p)
	if err != nil {
		t.Fatal(err)
	}
	if m.Unified != unified {
		t.Fatalf("cgroup2 mount = %q, want %q (octal escapes must be undone)", m.Unified, unified)
	}
	return m
}

func TestVersionIsV1OnAHybridHostAndV2WhereItHasTheControllers(t *testing.T) {
	m := writeMounts(t, "hugetlb")
	if m.V1["memory"] != "/sys/fs/cgroup/memory" || m.V1["cpuacct"] != "/sys/fs/cgroup/cpu acct" {
		t.Errorf("v1 mounts = %v (octal escapes must be undone)", m.V1)
	}
	if v, err := m.Version(Controllers...); v != 1 || err != nil {
		t.Errorf("hybrid host: Version = %d, %v; want 1 (cgroup2 holds only hugetlb)", v, err)
	}
	m = writeMounts(t, "cpuset cpu io memory hugetlb pids")
	if v, err := m.Version(Controllers...); v != 2 || err != nil {
		t.Errorf("cgroup2 with cpu, memory, pids: Version = %d, %v; want 2", v, err)
	}
	m.V1 = map[string]string{}
	m.Unified = ""
	if _, err := m.Version(Controllers...); err == nil || !strings.Contains(err.Error(), "cpu, memory, pids") {
		t.Errorf("no hierarchy: err = %v, want one naming the missing controllers", err)
	}
}

func TestWhereSaysWhichHierarchyOffersEachController(t *testing.T) {
	m := writeMounts(t, "hugetlb")
	for c, want := range map[string]struct {
		version int
		dir     string
	}{
		"memory":  {1, "/sys/fs/cgroup/memory"},
		"cpu":     {1, "/sys/fs/cgroup/cpu"},
		"cpuacct": {1, "/sys/fs/cgroup/cpu acct"},
		"hugetlb": {2, m.Unified},
		"io":      {0, ""},
	} {
		if v, dir := m.Where(c); v != want.version || dir != want.dir {
			t.Errorf("Where(%q) = v%d %q, want v%d %q", c, v, dir, want.version, want.dir)
		}
	}
	m = writeMounts(t, "cpu io memory pids")
	if v, dir := m.Where("memory"); v != 2 || dir != m.Unified {
		t.Errorf("memory enabled in cgroup2: Where = v%d %q, want v2 %q", v, dir, m.Unified)
	}
}

func TestSettingsPerVersion(t *testing.T) {
	l := Limits{VCPUs: 2, MemoryBytes: 300 << 20, Pids: 256}
	if got, want := Settings(1, l), []string{"cpu.cfs_period_us=100000", "cpu.cfs_quota_us=200000",
		"memory.limit_in_bytes=314572800", "pids.max=256"}; !reflect.DeepEqual(got, want) {
		t.Errorf("v1 = %q, want %q", got, want)
	}
	if got, want := Settings(2, l), []string{"cpu.max=200000 100000", "memory.max=314572800", "pids.max=256"}; !reflect.DeepEqual(got, want) {
		t.Errorf("v2 = %q, want %q", got, want)
	}
}

func TestLocateNamesTheJailersDirectories(t *testing.T) {
	m := writeMounts(t, "hugetlb")
	cg, err := m.Locate(1, "forkd", "vm1", Controllers)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"cpu": "/sys/fs/cgroup/cpu/forkd/vm1", "memory": "/sys/fs/cgroup/memory/forkd/vm1", "pids": "/sys/fs/cgroup/pids/forkd/vm1"}
	if !reflect.DeepEqual(cg.Dirs, want) {
		t.Errorf("v1 dirs = %v, want %v", cg.Dirs, want)
	}
	cg, err = m.Locate(2, "forkd", "vm1", Controllers)
	if err != nil || len(cg.dirs()) != 1 || cg.dirs()[0] != filepath.Join(m.Unified, "forkd", "vm1") {
		t.Errorf("v2 dirs = %v, %v; want one dir in the unified hierarchy", cg.dirs(), err)
	}
	if _, err := m.Locate(1, "forkd", "vm1", []string{"rdma"}); err == nil {
		t.Error("an unmounted controller located without error")
	}
}

func TestOOMKillsReadsEachVersionsCounter(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "memory.oom_control"), []byte("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "memory.events"), []byte("low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\n"), 0o644)
	for v, want := range map[int]uint64{1: 3, 2: 2} {
		n, err := Cgroup{Version: v, Dirs: map[string]string{"memory": dir}}.OOMKills()
		if err != nil || n != want {
			t.Errorf("v%d: OOMKills = %d, %v; want %d", v, n, err, want)
		}
	}
	if _, err := (Cgroup{Version: 1, Dirs: map[string]string{"memory": t.TempDir()}}).OOMKills(); err == nil {
		t.Error("a cgroup without its counter file read without error")
	}
}

// The jailer's v2 path, against a cgroup2 tree laid out as the kernel
// makes one (this project's hybrid hosts cannot give v2 the cpu, memory and
// pids controllers, which v1 holds): each controller enabled in
// cgroup.subtree_control from the root down to the parent, the v2 files
// written in the VMM's cgroup, the process moved in. On the hybrid layout
// (cgroup2 with hugetlb only) the same v2 request is refused naming the
// controller, never silently put in v1.
func TestSetupCgroupsV2WritesTheUnifiedFiles(t *testing.T) {
	m := writeMounts(t, "cpu memory pids hugetlb")
	cgFiles := []string{"cgroup.procs", "cgroup.subtree_control", "cpu.max", "memory.max", "pids.max"}
	for _, dir := range []string{m.Unified, filepath.Join(m.Unified, "forkd-x"), filepath.Join(m.Unified, "forkd-x", "vm1")} {
		os.MkdirAll(dir, 0o755)
		for _, f := range cgFiles {
			os.WriteFile(filepath.Join(dir, f), nil, 0o644)
		}
	}
	a := Args{ID: "vm1", CgroupVersion: 2, ParentCgroup: "forkd-x",
		Cgroups: Settings(2, Limits{VCPUs: 2, MemoryBytes: 300 << 20, Pids: 64})}
	if err := setupCgroups(m, a); err != nil {
		t.Fatal(err)
	}
	read := func(p ...string) string {
		b, _ := os.ReadFile(filepath.Join(append([]string{m.Unified}, p...)...))
		return string(b)
	}
	for _, dir := range []string{"", "forkd-x"} {
		for _, c := range Controllers {
			if !strings.Contains(read(dir, "cgroup.subtree_control"), "+"+c+"\n") {
				t.Errorf("%s/cgroup.subtree_control = %q, want +%s written", dir, read(dir, "cgroup.subtree_control"), c)
			}
		}
	}
	for file, want := range map[string]string{"cpu.max": "200000 100000\n", "memory.max": "314572800\n", "pids.max": "64\n",
		"cgroup.procs": strconv.Itoa(os.Getpid()) + "\n"} {
		if got := read("forkd-x", "vm1", file); got != want {
			t.Errorf("forkd-x/vm1/%s = %q, want %q", file, got, want)
		}
	}

	hybrid := writeMounts(t, "hugetlb")
	err := setupCgroups(hybrid, a)
	if err == nil || !strings.Contains(err.Error(), `"cpu" is not available`) {
		t.Errorf("v2 on a hybrid host: %v, want a refusal naming the controller", err)
	}
}
