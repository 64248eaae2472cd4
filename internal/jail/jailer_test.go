package jail

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/network/nettest"
	"github.com/forkd/forkd/internal/testenv"
)

func TestMain(m *testing.M) {
	os.Exit(testenv.Main(m))
}

// needCgroups stops a test where this host cannot give a jailed VMM its
// cpu, memory and pids cgroups.
func needCgroups(t *testing.T) Mounts {
	t.Helper()
	testenv.NeedJail(t, HostCgroups)
	m, err := ReadMounts(MountTable)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// jailed is one `forkd jailer` started by a test: its pid is the VMM's
// once the jailer has exec'd.
type jailed struct {
	t      *testing.T
	args   Args
	root   string
	cmd    *exec.Cmd
	out    *bytes.Buffer
	exited chan struct{}
	state  *os.ProcessState
	client *http.Client
}

type jailOpts struct {
	netns     string
	copyExec  bool
	noSeccomp bool
	memLimit  int64
}

// tag is unique per test run, for every host object a test names.
func tag() string {
	var b [4]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// startJailed jails forkd-vmm (the forkd the tests build, under the name
// that makes it the VMM) with the limits the manager gives a VM, and waits
// for its API socket inside the jail.
func startJailed(t *testing.T, m Mounts, o jailOpts) *jailed {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin", "forkd-vmm")
	if err := os.MkdirAll(filepath.Dir(bin), 0o755); err != nil {
		t.Fatal(err)
	}
	copyFile(t, testenv.ForkdBinary(t), bin, 0o755)
	tg := tag()
	version, _ := m.Version(Controllers...)
	if o.memLimit == 0 {
		o.memLimit = 512 << 20
	}
	vmmArgs := []string{"--api-sock", "/run/vmm.sock", "--level", "Debug"}
	if o.noSeccomp {
		vmmArgs = append(vmmArgs, "--no-seccomp")
	}
	a := Args{
		ID: "jt-" + tg, ExecFile: bin, UID: 64000, GID: 64000,
		ChrootBaseDir: filepath.Join(dir, "jail"), NetNS: o.netns, CgroupVersion: version,
		Cgroups:        Settings(version, Limits{VCPUs: 1, MemoryBytes: o.memLimit, Pids: 256}),
		ParentCgroup:   "forkd-test-" + tg,
		ResourceLimits: []string{"no-file=512", "fsize=1073741824"},
		VMMArgs:        vmmArgs,
	}
	j := &jailed{t: t, args: a, root: a.ChrootDir(), out: &bytes.Buffer{}, exited: make(chan struct{})}
	j.cmd = exec.Command(testenv.ForkdBinary(t), append([]string{"jailer"}, a.CommandLine()...)...)
	j.cmd.Stdout, j.cmd.Stderr = j.out, j.out
	if o.copyExec {
		j.cmd.Env = append(os.Environ(), EnvCopyExec+"=1")
	}
	if err := j.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { j.cmd.Wait(); j.state = j.cmd.ProcessState; close(j.exited) }()
	t.Cleanup(func() {
		j.cmd.Process.Kill()
		<-j.exited
		if t.Failed() {
			t.Logf("jailer/vmm output:\n%s", j.out)
		}
		cg, _ := m.Locate(version, a.ParentCgroup, a.ID, Controllers)
		if err := cg.Remove(); err != nil {
			t.Errorf("remove the VMM's cgroup: %v", err)
		}
		for _, d := range cg.dirs() {
			os.Remove(filepath.Dir(d)) // the test's parent cgroup
		}
	})
	sock := filepath.Join(j.root, "run", "vmm.sock")
	j.client = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return j
		}
		select {
		case <-j.exited:
			t.Fatalf("jailed VMM exited before its API socket answered: %v\n%s", j.state, j.out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("jailed VMM: %s did not answer in 30 s\n%s", sock, j.out)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (j *jailed) pid() int { return j.cmd.Process.Pid }

// call sends one API request to the jailed VMM.
func (j *jailed) call(method, path string, body any) (int, string, error) {
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest(method, "http://vmm"+path, bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	resp, err := j.client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(data), nil
}

func (j *jailed) mustCall(method, path string, body any, want int) string {
	j.t.Helper()
	code, text, err := j.call(method, path, body)
	if err != nil || code != want {
		j.t.Fatalf("%s %s: %d %s (%v), want %d", method, path, code, text, err, want)
	}
	return text
}

// status reads a field of /proc/<pid>/status.
func status(t *testing.T, pid int, field string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && k == field {
			return strings.Join(strings.Fields(v), " ")
		}
	}
	t.Fatalf("/proc/%d/status has no %s", pid, field)
	return ""
}

func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	sa, err := os.Stat(a)
	if err != nil {
		t.Fatal(err)
	}
	sb, err := os.Stat(b)
	if err != nil {
		t.Fatal(err)
	}
	return os.SameFile(sa, sb)
}

func TestJailedVMMRunsConfined(t *testing.T) {
	m := needCgroups(t)
	ns := nettest.Namespace(t)
	j := startJailed(t, m, jailOpts{netns: ns, memLimit: 300 << 20})
	pid := j.pid()
	if !strings.Contains(j.mustCall("GET", "/", nil, 200), `"state"`) {
		t.Error("GET / of the jailed VMM does not describe the instance")
	}

	if got := status(t, pid, "Uid"); got != "64000 64000 64000 64000" {
		t.Errorf("Uid = %q, want 64000 in every slot", got)
	}
	if got := status(t, pid, "Gid"); got != "64000 64000 64000 64000" {
		t.Errorf("Gid = %q, want 64000 in every slot", got)
	}
	if got := status(t, pid, "Groups"); got != "" {
		t.Errorf("Groups = %q, want none", got)
	}
	if got := status(t, pid, "Seccomp"); got != "2" {
		t.Errorf("Seccomp = %q, want 2 (filter mode)", got)
	}
	if got := status(t, pid, "NoNewPrivs"); got != "1" {
		t.Errorf("NoNewPrivs = %q, want 1", got)
	}
	if !sameFile(t, fmt.Sprintf("/proc/%d/root", pid), j.root) {
		t.Errorf("the VMM's root is not its jail %s", j.root)
	}
	if sameFile(t, fmt.Sprintf("/proc/%d/ns/net", pid), "/proc/self/ns/net") || !sameFile(t, fmt.Sprintf("/proc/%d/ns/net", pid), ns) {
		t.Errorf("the VMM is not in the network namespace %s", ns)
	}
	if sameFile(t, fmt.Sprintf("/proc/%d/ns/mnt", pid), "/proc/self/ns/mnt") {
		t.Error("the VMM shares the test's mount namespace")
	}

	version, _ := m.Version(Controllers...)
	cg, err := m.Locate(version, j.args.ParentCgroup, j.args.ID, Controllers)
	if err != nil {
		t.Fatal(err)
	}
	if lim, err := cg.MemoryLimit(); err != nil || lim != 300<<20 {
		t.Errorf("memory limit = %d, %v; want %d", lim, err, 300<<20)
	}
	for ctrl, dir := range cg.Dirs {
		procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		if err != nil || !strings.Contains("\n"+string(procs), "\n"+strconv.Itoa(pid)+"\n") {
			t.Errorf("%s cgroup %s does not hold the VMM (cgroup.procs %q, %v)", ctrl, dir, procs, err)
		}
	}
	limits, _ := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	for _, want := range []string{`Max open files\s+512\s+512`, `Max file size\s+1073741824\s+1073741824`} {
		if !regexpMatch(want, string(limits)) {
			t.Errorf("/proc/%d/limits lacks %s:\n%s", pid, want, limits)
		}
	}

	// The jail: device nodes the VM's uid owns, the exec file, the pid file.
	devs := map[string][2]uint32{"dev/net/tun": {10, 200}}
	if minor, err := miscMinor("/proc/misc", "userfaultfd"); err == nil {
		devs["dev/userfaultfd"] = [2]uint32{10, minor}
	}
	if _, err := os.Stat("/dev/kvm"); err == nil {
		devs["dev/kvm"] = [2]uint32{10, 232}
	}
	for name, num := range devs {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(j.root, name), &st); err != nil {
			t.Errorf("/%s in the jail: %v", name, err)
			continue
		}
		if st.Mode&syscall.S_IFMT != syscall.S_IFCHR || st.Mode&0o777 != 0o600 || st.Uid != 64000 || st.Gid != 64000 ||
			unix.Major(st.Rdev) != num[0] || unix.Minor(st.Rdev) != num[1] {
			t.Errorf("/%s: mode %o uid %d gid %d rdev %d:%d; want a 0600 char device %d:%d owned by 64000",
				name, st.Mode, st.Uid, st.Gid, unix.Major(st.Rdev), unix.Minor(st.Rdev), num[0], num[1])
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(j.root, &st); err != nil || st.Uid != 64000 || st.Mode&0o777 != 0o700 {
		t.Errorf("jail root: uid %d mode %o (%v); want the VM's uid, 0700", st.Uid, st.Mode&0o777, err)
	}
	if err := syscall.Stat(filepath.Join(j.root, "forkd-vmm"), &st); err != nil || st.Nlink != 2 || st.Uid != 0 {
		t.Errorf("exec file in the jail: nlink %d uid %d (%v); want the root-owned source hardlinked", st.Nlink, st.Uid, err)
	}
	if b, err := os.ReadFile(filepath.Join(j.root, "forkd-vmm.pid")); err != nil || string(b) != strconv.Itoa(pid) {
		t.Errorf("pid file = %q, %v; want %d", b, err, pid)
	}

	// From inside: nothing outside the jail can be named. The twin opens
	// what the jail does hold, so a failure above is the jail's doing.
	secret := filepath.Join(filepath.Dir(filepath.Dir(filepath.Dir(j.root))), "secret")
	if err := os.WriteFile(secret, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/etc/shadow", "/etc/passwd", secret, "../../../secret", "/proc/1/root/etc/shadow"} {
		if code, text, err := j.call("PUT", "/test/open", map[string]any{"path": p}); err != nil || code != 400 {
			t.Errorf("jailed VMM opened %s: %d %s %v", p, code, text, err)
		}
	}
	j.mustCall("PUT", "/test/open", map[string]any{"path": "/forkd-vmm.pid"}, 204)
	// The exec file is shared with every jail: the VMM cannot change it.
	if code, _, _ := j.call("PUT", "/test/open", map[string]any{"path": "/forkd-vmm", "write": true}); code != 400 {
		t.Error("jailed VMM opened its shared exec file for writing")
	}
}

func regexpMatch(pattern, s string) bool { return regexp.MustCompile(pattern).MatchString(s) }

func TestCopiedExecFileIsTheVMsOwn(t *testing.T) {
	m := needCgroups(t)
	j := startJailed(t, m, jailOpts{copyExec: true})
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(j.root, "forkd-vmm"), &st); err != nil || st.Nlink != 1 || st.Uid != 64000 {
		t.Errorf("copied exec file: nlink %d uid %d (%v); want one link, owned by the VM's uid (as the real jailer leaves it)", st.Nlink, st.Uid, err)
	}
}

// waitExit waits for the jailed process to end and returns how it ended.
func (j *jailed) waitExit() syscall.WaitStatus {
	j.t.Helper()
	select {
	case <-j.exited:
	case <-time.After(60 * time.Second):
		j.t.Fatal("jailed VMM still running 60 s after it should have died")
	}
	return j.state.Sys().(syscall.WaitStatus)
}

func TestSeccompViolationKillsTheVMMWithSIGSYS(t *testing.T) {
	m := needCgroups(t)
	j := startJailed(t, m, jailOpts{})
	if _, _, err := j.call("PUT", "/test/violate-seccomp", struct{}{}); err == nil {
		t.Error("the request that breaks the filter got an answer")
	}
	ws := j.waitExit()
	if !ws.Signaled() || ws.Signal() != syscall.SIGSYS {
		t.Errorf("exit = %v, want killed by SIGSYS", ws)
	}
	if got := ExitCause(ws, 0); got != CauseSeccomp {
		t.Errorf("ExitCause = %q, want the seccomp cause", got)
	}
}

// The twin: the same request without the filter is an ordinary syscall.
func TestWithoutSeccompTheSameRequestIsHarmless(t *testing.T) {
	m := needCgroups(t)
	j := startJailed(t, m, jailOpts{noSeccomp: true})
	if got := status(t, j.pid(), "Seccomp"); got != "0" {
		t.Errorf("--no-seccomp: Seccomp = %q, want 0", got)
	}
	j.mustCall("PUT", "/test/violate-seccomp", struct{}{}, 204)
	j.mustCall("GET", "/", nil, 200)
}

func TestMemoryLimitKillsAndIsCounted(t *testing.T) {
	m := needCgroups(t)
	j := startJailed(t, m, jailOpts{memLimit: 96 << 20})
	if err := os.WriteFile(filepath.Join(j.root, "kernel"), []byte("k"), 0o644); err != nil {
		t.Fatal(err)
	}
	j.mustCall("PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 256}, 204)
	j.mustCall("PUT", "/boot-source", map[string]any{"kernel_image_path": "/kernel",
		"boot_args": "forkd.ws_mib=200 forkd.write_pct=100 forkd.rate=0"}, 204)
	// The guest touches 200 MiB at once: the VMM may die before it answers.
	j.call("PUT", "/actions", map[string]any{"action_type": "InstanceStart"})
	ws := j.waitExit()
	if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Errorf("exit = %v, want SIGKILL from the OOM killer", ws)
	}
	version, _ := m.Version(Controllers...)
	cg, _ := m.Locate(version, j.args.ParentCgroup, j.args.ID, Controllers)
	n, err := cg.OOMKills()
	if err != nil || n == 0 {
		t.Errorf("OOMKills = %d, %v; want the kill counted", n, err)
	}
	if got := ExitCause(ws, n); got != CauseMemoryLimit {
		t.Errorf("ExitCause = %q, want the memory-limit cause", got)
	}
}

func TestJailerRefusesWhatForkdNeverAsksFor(t *testing.T) {
	for _, a := range []Args{
		{ID: "x", ExecFile: "/bin/true", UID: 1, GID: 1, Daemonize: true},
		{ID: "x", ExecFile: "/bin/true", UID: 1, GID: 1, NewPidNS: true},
	} {
		if err := Run(a, Options{}); !errors.Is(err, ErrUsage) {
			t.Errorf("Run(%+v) = %v, want a usage error", a, err)
		}
	}
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dst, mode); err != nil {
		t.Fatal(err)
	}
}
