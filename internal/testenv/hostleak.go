package testenv

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// A data dir's jailed VMMs get cgroups below forkd-<tag> in each cgroup
// hierarchy, and a networked daemon's VMs get named network namespaces
// forkd-<tag>-<slot> (<tag>: DataDirTag). Both outlive the data dir unless
// whoever tears it down removes them (instance.RemoveJailCgroups once its
// VMMs are gone; deleting the last networked VM). Once the data dir is
// deleted nothing says whose they were, so they pile up on the host:
// hundreds of empty forkd-<tag> cgroups once did. Main checks it for a
// whole test binary, as it checks the host's VM links.

// forkdCgroup matches a data dir's parent cgroup (instance's
// jailParentCgroup): "forkd-" and the data dir's tag.
var forkdCgroup = regexp.MustCompile(`^forkd-[0-9a-f]{6}$`)

// vmNetNS matches a VM's network namespace (network's nsPrefix and slot),
// capturing the data dir's tag.
var vmNetNS = regexp.MustCompile(`^forkd-([0-9a-f]{6})-[0-9a-f]+$`)

// JailParentCgroupTag returns the data dir tag of a cgroup named like a
// data dir's jail parent (forkd-<tag>), or false.
func JailParentCgroupTag(name string) (string, bool) {
	if !forkdCgroup.MatchString(name) {
		return "", false
	}
	return strings.TrimPrefix(name, "forkd-"), true
}

// VMNamespaceTag returns the data dir tag of a network namespace named
// like a VM's (forkd-<tag>-<slot>), or false.
func VMNamespaceTag(name string) (string, bool) {
	m := vmNetNS.FindStringSubmatch(name)
	if m == nil {
		return "", false
	}
	return m[1], true
}

// NetNSDir is where named network namespaces are mounted (`ip netns`).
const NetNSDir = "/var/run/netns"

// NamespacePrefix starts the name of every network namespace a test makes
// for itself (nettest.Namespace), followed by the test process's pid in
// decimal, a dash and a random part: TestNamespaceName.
const NamespacePrefix = "forkdtest-"

// TestNamespaceName is the name for a network namespace made by this test
// process: NamespacePrefix, the pid, "-", random (hex). Main knows by the
// pid which of them are this binary's.
func TestNamespaceName(random string) string {
	return NamespacePrefix + strconv.Itoa(os.Getpid()) + "-" + random
}

// DataDirTag is the tag forkd derives from a data dir (network.Tag, whose
// test checks this agrees): the first six hex digits of the SHA-256 of its
// path.
func DataDirTag(dataDir string) string {
	sum := sha256.Sum256([]byte(dataDir))
	return hex.EncodeToString(sum[:])[:6]
}

// HostObjectRoots are where forkd's host objects are looked for: the
// cgroup hierarchies' mount points and the named network namespaces' dir.
type HostObjectRoots struct {
	Cgroups []string
	NetNS   string
}

// CgroupFS is where this host's cgroup hierarchies are mounted: the
// cgroup2 root itself, or one hierarchy a directory below it.
const CgroupFS = "/sys/fs/cgroup"

// HostRoots are this host's: every cgroup hierarchy at or one level below
// CgroupFS (a link, such as cpu -> cpu,cpuacct, counted once), and
// NetNSDir.
func HostRoots() (HostObjectRoots, error) {
	r := HostObjectRoots{NetNS: NetNSDir}
	isCgroup := func(dir string) bool {
		var st unix.Statfs_t
		return unix.Statfs(dir, &st) == nil && (st.Type == unix.CGROUP_SUPER_MAGIC || st.Type == unix.CGROUP2_SUPER_MAGIC)
	}
	if isCgroup(CgroupFS) {
		r.Cgroups = append(r.Cgroups, CgroupFS)
	}
	ents, err := os.ReadDir(CgroupFS)
	if err != nil {
		return r, fmt.Errorf("testenv: list cgroup hierarchies: %w", err)
	}
	seen := map[string]bool{}
	for _, e := range ents {
		dir, err := filepath.EvalSymlinks(filepath.Join(CgroupFS, e.Name()))
		if err == nil && !seen[dir] && isCgroup(dir) {
			seen[dir] = true
			r.Cgroups = append(r.Cgroups, dir)
		}
	}
	return r, nil
}

// list returns the paths of forkd's host objects under r now: the
// forkd-<tag> cgroups at the top of each hierarchy, and the named network
// namespaces whose names start with "forkd" (forkd-<tag>-<slot>, the
// demo's forkd-demo-*, the tests' forkdtest-*).
func (r HostObjectRoots) list() (map[string]bool, error) {
	out := map[string]bool{}
	for _, root := range r.Cgroups {
		ents, err := os.ReadDir(root)
		if err != nil {
			return nil, fmt.Errorf("testenv: list cgroups: %w", err)
		}
		for _, e := range ents {
			if e.IsDir() && forkdCgroup.MatchString(e.Name()) {
				out[filepath.Join(root, e.Name())] = true
			}
		}
	}
	if r.NetNS != "" {
		ents, err := os.ReadDir(r.NetNS)
		if err != nil && !os.IsNotExist(err) {
			return nil, fmt.Errorf("testenv: list network namespaces: %w", err)
		}
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), "forkd") {
				out[filepath.Join(r.NetNS, e.Name())] = true
			}
		}
	}
	return out, nil
}

// A HostWatch tells which of forkd's host objects (HostObjectRoots.list)
// a test binary left behind.
type HostWatch struct {
	roots  HostObjectRoots
	before map[string]bool
}

// WatchHost notes the objects under roots present now: they are not the
// watcher's.
func WatchHost(roots HostObjectRoots) (*HostWatch, error) {
	before, err := roots.list()
	if err != nil {
		return nil, err
	}
	return &HostWatch{roots: roots, before: before}, nil
}

// Leftovers returns, sorted, the objects that appeared since the watch
// began and that nothing alive accounts for: what this process left
// behind, once every test is over. Others' tests run on this host at the
// same time (other packages, other checkouts), and their objects are
// theirs while they live, so an object is left alone while
//   - it is a cgroup that holds a process (a VMM still runs there), or a
//     namespace some process or thread is in or holds open;
//   - its tag is that of a path some live process names (an open file,
//     its cwd or root, an argument) or of a dir above one: a daemon or
//     test manager still uses the data dir;
//   - it is a test namespace of another process (NamespacePrefix with
//     another pid).
//
// A live owner can be between two of those for a moment (a daemon
// restarting), so an object is reported only when none of this held at
// any look over grace (looks every 200 ms); an object of this process's
// own (NamespacePrefix with its pid) at once.
func (w *HostWatch) Leftovers(grace time.Duration) ([]string, error) {
	self := TestNamespaceName("")
	deadline := time.Now().Add(grace)
	var suspects map[string]bool
	for {
		now, err := w.roots.list()
		if err != nil {
			return nil, err
		}
		live := liveHolders()
		next := map[string]bool{}
		for obj := range now {
			if w.before[obj] || (suspects != nil && !suspects[obj]) {
				continue
			}
			name := filepath.Base(obj)
			switch {
			case strings.HasPrefix(name, self):
				next[obj] = true
			case strings.HasPrefix(name, NamespacePrefix) && isTestNamespaceOfAnother(name):
			case !w.accounted(obj, live):
				next[obj] = true
			}
		}
		suspects = next
		if len(suspects) == 0 || !time.Now().Before(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	out := make([]string, 0, len(suspects))
	for obj := range suspects {
		out = append(out, obj)
	}
	sort.Strings(out)
	return out, nil
}

// isTestNamespaceOfAnother reports whether name is a test namespace named
// by TestNamespaceName in another process.
func isTestNamespaceOfAnother(name string) bool {
	pid, _, ok := strings.Cut(strings.TrimPrefix(name, NamespacePrefix), "-")
	if !ok {
		return false
	}
	n, err := strconv.Atoi(pid)
	return err == nil && n != os.Getpid()
}

// accounted reports whether something alive accounts for obj.
func (w *HostWatch) accounted(obj string, live holders) bool {
	name := filepath.Base(obj)
	if filepath.Dir(obj) == filepath.Clean(w.roots.NetNS) {
		var st syscall.Stat_t
		if err := syscall.Stat(obj, &st); err == nil && live.netns[st.Ino] {
			return true
		}
		tag, ok := VMNamespaceTag(name)
		return ok && live.tags[tag]
	}
	tag, _ := JailParentCgroupTag(name)
	return cgroupHoldsProcess(obj) || live.tags[tag]
}

// cgroupHoldsProcess reports whether the cgroup at dir or one below it
// holds a process.
func cgroupHoldsProcess(dir string) bool {
	found := false
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || found || !d.IsDir() {
			return nil
		}
		if b, err := os.ReadFile(filepath.Join(p, "cgroup.procs")); err == nil && len(strings.TrimSpace(string(b))) > 0 {
			found = true
			return filepath.SkipAll
		}
		return nil
	})
	return found
}

// holders is what the live processes of this host use: the tags of every
// path they name or any of its parents, and the network namespaces
// (inode numbers) their threads are in or hold open.
type holders struct {
	tags  map[string]bool
	netns map[uint64]bool
}

// liveHolders reads /proc. A process that exits meanwhile is skipped.
func liveHolders() holders {
	h := holders{tags: map[string]bool{}, netns: map[uint64]bool{}}
	addPath := func(p string) {
		p = strings.TrimSuffix(p, " (deleted)")
		if !strings.HasPrefix(p, "/") {
			return
		}
		for p = filepath.Clean(p); p != "/"; p = filepath.Dir(p) {
			h.tags[DataDirTag(p)] = true
		}
	}
	addNS := func(link string) {
		if rest, ok := strings.CutPrefix(link, "net:["); ok {
			if n, err := strconv.ParseUint(strings.TrimSuffix(rest, "]"), 10, 64); err == nil {
				h.netns[n] = true
			}
		}
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err != nil {
			continue
		}
		dir := "/proc/" + p.Name()
		for _, l := range []string{"cwd", "root"} {
			if t, err := os.Readlink(filepath.Join(dir, l)); err == nil {
				addPath(t)
			}
		}
		if b, err := os.ReadFile(filepath.Join(dir, "cmdline")); err == nil {
			for _, arg := range strings.Split(string(b), "\x00") {
				if _, v, ok := strings.Cut(arg, "="); ok && strings.HasPrefix(v, "/") {
					arg = v // --data-dir=/x
				}
				addPath(arg)
			}
		}
		fds, _ := os.ReadDir(filepath.Join(dir, "fd"))
		for _, fd := range fds {
			fd := filepath.Join(dir, "fd", fd.Name())
			t, err := os.Readlink(fd)
			if err != nil {
				continue
			}
			addPath(t)
			addNS(t)
			if strings.HasPrefix(t, "/run/netns/") || strings.HasPrefix(t, NetNSDir+"/") {
				// A named namespace opened by its path reads as the path.
				var st syscall.Stat_t
				if syscall.Stat(fd, &st) == nil {
					h.netns[st.Ino] = true
				}
			}
		}
		tasks, _ := os.ReadDir(filepath.Join(dir, "task"))
		for _, t := range tasks {
			if l, err := os.Readlink(filepath.Join(dir, "task", t.Name(), "ns", "net")); err == nil {
				addNS(l)
			}
		}
	}
	return h
}

// HostLeftoverReport is Main's failure message for objects a test binary
// left on the host.
func HostLeftoverReport(left []string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "FAIL: %d forkd host object(s) appeared while these tests ran and are still there, with nothing alive using them: %s\n",
		len(left), strings.Join(left, " "))
	fmt.Fprint(&b, "  A forkd-<tag> cgroup is a data dir's jail parent (<tag>: the first 6 hex digits of the SHA-256 of the data\n"+
		"  dir's path): a test that tears a data dir down must kill its VMMs and then call\n"+
		"  instance.RemoveJailCgroups (instance tests' testJail does; daemonproc's Teardown does it for a\n"+
		"  daemon's data dir). A namespace\n"+
		"  forkd-<tag>-<slot> is a VM's network: delete the data dir's VMs before the daemon goes. A test's own\n"+
		"  namespace (nettest.Namespace) is removed by its cleanup.\n"+
		"  (A test run of another checkout on this machine that leaked at the same time would show here too.)\n")
	return b.String()
}
