package jail

import (
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
)

// DefaultChrootBase is the jailer's default --chroot-base-dir.
const DefaultChrootBase = "/srv/jailer"

// Resource limit names of --resource-limit.
const (
	LimitFsize  = "fsize"
	LimitNoFile = "no-file"
)

// defaultNoFile is the no-file limit a jailer sets when none is given.
const defaultNoFile = 2048

// Args is one jailer command line, in the form Firecracker's own jailer takes.
type Args struct {
	ID            string
	ExecFile      string
	UID, GID      int
	ChrootBaseDir string // "" = DefaultChrootBase
	NetNS         string // a network namespace handle to join; "" = stay
	CgroupVersion int    // 1 or 2; 0 = 1
	// Cgroups are FILE=VALUE settings, e.g. "memory.limit_in_bytes=1073741824".
	Cgroups []string
	// ParentCgroup is the cgroup, relative to each controller's mount, under
	// which <id> is created; "" = the exec file's name.
	ParentCgroup string
	// ResourceLimits are NAME=VALUE, NAME being LimitFsize or LimitNoFile.
	ResourceLimits []string
	// Daemonize and NewPidNS are the real jailer's; forkd never sets them
	// and `forkd jailer` refuses them.
	Daemonize, NewPidNS bool
	// VMMArgs follow "--" and are passed to the VMM.
	VMMArgs []string
}

// idPattern is the jailer's rule for --id: alphanumerics and hyphens, at
// most 64 characters.
var idPattern = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[A-Za-z0-9-]{1,64}$`) })

// ErrUsage wraps every command-line error.
var ErrUsage = errors.New("jailer usage")

func usage(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrUsage, fmt.Sprintf(format, a...))
}

// CommandLine is the jailer's argument list for a (everything after the
// program name). It is what the driver gives the real jailer and `forkd
// jailer` alike.
func (a Args) CommandLine() []string {
	out := []string{"--id", a.ID, "--exec-file", a.ExecFile,
		"--uid", strconv.Itoa(a.UID), "--gid", strconv.Itoa(a.GID)}
	if a.ChrootBaseDir != "" {
		out = append(out, "--chroot-base-dir", a.ChrootBaseDir)
	}
	if a.NetNS != "" {
		out = append(out, "--netns", a.NetNS)
	}
	if a.CgroupVersion != 0 {
		out = append(out, "--cgroup-version", strconv.Itoa(a.CgroupVersion))
	}
	for _, c := range a.Cgroups {
		out = append(out, "--cgroup", c)
	}
	if a.ParentCgroup != "" {
		out = append(out, "--parent-cgroup", a.ParentCgroup)
	}
	for _, r := range a.ResourceLimits {
		out = append(out, "--resource-limit", r)
	}
	if a.Daemonize {
		out = append(out, "--daemonize")
	}
	if a.NewPidNS {
		out = append(out, "--new-pid-ns")
	}
	if len(a.VMMArgs) > 0 {
		out = append(append(out, "--"), a.VMMArgs...)
	}
	return out
}

// Parse reads a jailer command line (without the program name). Flags take
// their value as the next argument or after "="; everything after "--" is
// the VMM's.
func Parse(args []string) (Args, error) {
	var a Args
	seen := map[string]bool{}
	single := func(name string) error {
		if seen[name] {
			return usage("--%s given twice", name)
		}
		seen[name] = true
		return nil
	}
	for i := 0; i < len(args); i++ {
		arg := args[i]
		if arg == "--" {
			a.VMMArgs = append([]string(nil), args[i+1:]...)
			break
		}
		if !strings.HasPrefix(arg, "--") {
			return a, usage("unexpected argument %q (VMM arguments go after --)", arg)
		}
		name, value, hasValue := strings.Cut(arg[2:], "=")
		switch name {
		case "daemonize", "new-pid-ns":
			if hasValue {
				return a, usage("--%s takes no value", name)
			}
			if name == "daemonize" {
				a.Daemonize = true
			} else {
				a.NewPidNS = true
			}
			continue
		}
		if !hasValue {
			if i+1 >= len(args) {
				return a, usage("--%s needs a value", name)
			}
			i++
			value = args[i]
		}
		var err error
		switch name {
		case "id":
			err = single(name)
			a.ID = value
		case "exec-file":
			err = single(name)
			a.ExecFile = value
		case "uid":
			if err = single(name); err == nil {
				a.UID, err = parseID("uid", value)
			}
		case "gid":
			if err = single(name); err == nil {
				a.GID, err = parseID("gid", value)
			}
		case "chroot-base-dir":
			err = single(name)
			a.ChrootBaseDir = value
		case "netns":
			err = single(name)
			a.NetNS = value
		case "cgroup-version":
			if err = single(name); err == nil {
				a.CgroupVersion, err = strconv.Atoi(value)
				if err != nil || (a.CgroupVersion != 1 && a.CgroupVersion != 2) {
					err = usage("--cgroup-version %q: want 1 or 2", value)
				}
			}
		case "cgroup":
			a.Cgroups = append(a.Cgroups, value)
		case "parent-cgroup":
			err = single(name)
			a.ParentCgroup = value
		case "resource-limit":
			a.ResourceLimits = append(a.ResourceLimits, value)
		default:
			err = usage("unknown flag --%s", name)
		}
		if err != nil {
			return a, err
		}
	}
	for _, req := range []string{"id", "exec-file", "uid", "gid"} {
		if !seen[req] {
			return a, usage("--%s is required", req)
		}
	}
	return a, a.Validate()
}

func parseID(name, v string) (int, error) {
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil {
		return 0, usage("--%s %q: want a number", name, v)
	}
	return int(n), nil
}

// Validate checks what can be checked without touching the host: the id,
// the paths' shape, the cgroup and resource-limit settings.
func (a Args) Validate() error {
	if !idPattern().MatchString(a.ID) {
		return usage("--id %q: want 1-64 letters, digits or hyphens", a.ID)
	}
	if a.ExecFile == "" {
		return usage("--exec-file is required")
	}
	if a.UID < 0 || a.GID < 0 {
		return usage("--uid and --gid must not be negative")
	}
	if b := a.ChrootBaseDir; b != "" && !filepath.IsAbs(b) {
		return usage("--chroot-base-dir %q: want an absolute path", b)
	}
	if a.CgroupVersion != 0 && a.CgroupVersion != 1 && a.CgroupVersion != 2 {
		return usage("--cgroup-version %d: want 1 or 2", a.CgroupVersion)
	}
	for _, c := range a.Cgroups {
		if _, _, err := parseCgroupSetting(c); err != nil {
			return err
		}
	}
	if p := a.ParentCgroup; p != "" {
		if filepath.IsAbs(p) || filepath.Clean(p) != p || p == ".." || strings.HasPrefix(p, "../") {
			return usage("--parent-cgroup %q: want a clean relative path inside the hierarchy", p)
		}
	}
	for _, r := range a.ResourceLimits {
		if _, _, err := parseResourceLimit(r); err != nil {
			return err
		}
	}
	return nil
}

// parseCgroupSetting splits FILE=VALUE and returns the controller (FILE's
// prefix before the first dot).
func parseCgroupSetting(s string) (file, value string, err error) {
	file, value, ok := strings.Cut(s, "=")
	ctrl, _, dot := strings.Cut(file, ".")
	if !ok || !dot || ctrl == "" || strings.ContainsAny(file, "/\x00") || file == "." || file == ".." {
		return "", "", usage("--cgroup %q: want <controller>.<file>=<value>", s)
	}
	return file, value, nil
}

// parseResourceLimit splits NAME=VALUE of --resource-limit.
func parseResourceLimit(s string) (string, uint64, error) {
	name, value, ok := strings.Cut(s, "=")
	if !ok || (name != LimitFsize && name != LimitNoFile) {
		return "", 0, usage("--resource-limit %q: want fsize=N or no-file=N", s)
	}
	n, err := strconv.ParseUint(value, 10, 64)
	if err != nil {
		return "", 0, usage("--resource-limit %q: %q is not a number", s, value)
	}
	return name, n, nil
}

// ExecName is the name the exec file takes inside the jail (and in the jail
// root's path): the base name of execFile.
func ExecName(execFile string) string { return filepath.Base(execFile) }

// ChrootDir is the jail root a jailer builds for a: the exec file's name is
// that of the path given (the real jailer canonicalises it first; callers
// that build the path must give the exec file's real name).
func (a Args) ChrootDir() string {
	base := a.ChrootBaseDir
	if base == "" {
		base = DefaultChrootBase
	}
	return ChrootDir(base, ExecName(a.ExecFile), a.ID)
}

// ChrootDir is <base>/<execName>/<id>/root.
func ChrootDir(base, execName, id string) string {
	return filepath.Join(base, execName, id, "root")
}

// parentCgroup is --parent-cgroup or its default, the exec file's name.
func (a Args) parentCgroup() string {
	if a.ParentCgroup != "" {
		return a.ParentCgroup
	}
	return ExecName(a.ExecFile)
}
