package jail

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

func TestCommandLineParsesBackToTheSameArgs(t *testing.T) {
	a := Args{
		ID: "0123456789abcdef01234567", ExecFile: "/usr/bin/firecracker", UID: 40001, GID: 40001,
		ChrootBaseDir: "/var/lib/forkd/jail", NetNS: "/var/run/netns/forkd-a-1",
		CgroupVersion: 1, Cgroups: []string{"memory.limit_in_bytes=1073741824", "cpu.cfs_quota_us=100000"},
		ParentCgroup: "forkd", ResourceLimits: []string{"no-file=1024", "fsize=2147483648"},
		VMMArgs: []string{"--api-sock", "/run/firecracker.socket", "--no-seccomp"},
	}
	got, err := Parse(a.CommandLine())
	if err != nil {
		t.Fatalf("Parse(%q): %v", a.CommandLine(), err)
	}
	if !reflect.DeepEqual(got, a) {
		t.Errorf("round trip:\n got %+v\nwant %+v", got, a)
	}
	if want := "/var/lib/forkd/jail/firecracker/0123456789abcdef01234567/root"; a.ChrootDir() != want {
		t.Errorf("ChrootDir = %s, want %s", a.ChrootDir(), want)
	}
}

func TestParseAcceptsTheJailersForms(t *testing.T) {
	got, err := Parse([]string{"--id=a-1", "--exec-file", "/x/fc", "--uid=5", "--gid", "6", "--daemonize", "--", "--id", "ignored"})
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != "a-1" || got.UID != 5 || got.GID != 6 || !got.Daemonize || !reflect.DeepEqual(got.VMMArgs, []string{"--id", "ignored"}) {
		t.Errorf("Parse = %+v", got)
	}
	if got.ChrootDir() != "/srv/jailer/fc/a-1/root" || got.parentCgroup() != "fc" {
		t.Errorf("defaults: chroot %s, parent cgroup %s; want the jailer's /srv/jailer and the exec name", got.ChrootDir(), got.parentCgroup())
	}
}

func TestParseRefusesBadInput(t *testing.T) {
	base := []string{"--id", "vm1", "--exec-file", "/bin/fc", "--uid", "1", "--gid", "1"}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"missing id", []string{"--exec-file", "/bin/fc", "--uid", "1", "--gid", "1"}, "--id is required"},
		{"missing uid", []string{"--id", "a", "--exec-file", "/bin/fc", "--gid", "1"}, "--uid is required"},
		{"id with a slash", append([]string{"--id", "../x"}, base[2:]...), "--id"},
		{"id too long", append([]string{"--id", strings.Repeat("a", 65)}, base[2:]...), "--id"},
		{"uid not a number", []string{"--id", "a", "--exec-file", "/bin/fc", "--uid", "root", "--gid", "1"}, "want a number"},
		{"negative gid", []string{"--id", "a", "--exec-file", "/bin/fc", "--uid", "1", "--gid", "-1"}, "want a number"},
		{"twice", append(base, "--uid", "2"), "given twice"},
		{"unknown flag", append(base, "--seccomp-level", "2"), "unknown flag"},
		{"stray argument", append(base, "extra"), "unexpected argument"},
		{"value missing", append(base, "--netns"), "needs a value"},
		{"relative chroot base", append(base, "--chroot-base-dir", "jail"), "absolute"},
		{"cgroup version", append(base, "--cgroup-version", "3"), "want 1 or 2"},
		{"cgroup without value", append(base, "--cgroup", "memory.max"), "--cgroup"},
		{"cgroup without controller", append(base, "--cgroup", "max=5"), "--cgroup"},
		{"cgroup file with a slash", append(base, "--cgroup", "memory.x/../../tasks=1"), "--cgroup"},
		{"parent cgroup escapes", append(base, "--parent-cgroup", "../x"), "--parent-cgroup"},
		{"parent cgroup absolute", append(base, "--parent-cgroup", "/x"), "--parent-cgroup"},
		{"unknown rlimit", append(base, "--resource-limit", "nproc=5"), "fsize=N or no-file=N"},
		{"rlimit not a number", append(base, "--resource-limit", "fsize=big"), "not a number"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(tc.args)
			if !errors.Is(err, ErrUsage) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Parse(%q) = %v, want a usage error containing %q", tc.args, err, tc.want)
			}
		})
	}
}
