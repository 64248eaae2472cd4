package jail

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Options change how `forkd jailer` builds a jail; the command line is the
// real jailer's and carries none of them.
type Options struct {
	// CopyExec copies the exec file into the jail, as the real jailer
	// always does, instead of hardlinking it when it can.
	CopyExec bool
	// Warn receives the jailer's warnings (a device it could not create
	// that the VMM can live without). nil discards them.
	Warn io.Writer
}

// EnvCopyExec set to 1 makes `forkd jailer` copy the exec file (Options.CopyExec).
const EnvCopyExec = "FORKD_JAILER_COPY_EXEC"

// A device node the jailer creates inside the jail, owned by the VM's uid.
type device struct {
	path         string
	major, minor uint32
	optional     bool // a failure is a warning (as the real jailer treats urandom)
}

// Device numbers, from the kernel's devices.txt (misc devices are major 10).
const (
	miscMajor = 10
	tunMinor  = 200
	kvmMinor  = 232
)

// jailDirs are created (0700) and given to the VM's uid inside the jail:
// "/" so the VMM can create its API socket and snapshot files, /dev and
// /dev/net for the device nodes, /run for Firecracker's default socket.
var jailDirs = []string{"/", "/dev", "/dev/net", "/run"}

// Run is `forkd jailer`: it builds the jail a describes and execs the VMM
// inside it. It returns only on failure; the process may then be in a
// half-built jail and must exit.
func Run(a Args, opt Options) error {
	if err := a.Validate(); err != nil {
		return err
	}
	if a.Daemonize || a.NewPidNS {
		return usage("--daemonize and --new-pid-ns are not supported by forkd jailer: the VMM must stay its parent's child")
	}
	if os.Geteuid() != 0 {
		return errors.New("jailer: must run as root (it mounts, pivot_roots, creates device nodes and changes uid)")
	}
	start := time.Now()
	startCPU := cpuTimeUS()
	// Namespaces and the root directory are per thread in a Go process:
	// everything from here to the exec happens on this one thread.
	runtime.LockOSThread()

	exec, err := canonicalExec(a.ExecFile)
	if err != nil {
		return err
	}
	name := filepath.Base(exec)
	base := a.ChrootBaseDir
	if base == "" {
		base = DefaultChrootBase
	}
	root := ChrootDir(base, name, a.ID)
	uffdMinor, uffdErr := miscMinor("/proc/misc", "userfaultfd")
	_, kvmErr := os.Stat("/dev/kvm")
	mounts, err := ReadMounts(MountTable)
	if err != nil && len(a.Cgroups) > 0 {
		return err
	}

	// Nothing but stdio crosses into the VMM, and none of our environment.
	if err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err != nil {
		return fmt.Errorf("jailer: mark descriptors close-on-exec: %w", err)
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fmt.Errorf("jailer: create jail root: %w", err)
	}
	if err := placeExec(exec, filepath.Join(root, name), a.UID, a.GID, opt.CopyExec); err != nil {
		return err
	}
	if a.NetNS != "" {
		if err := joinNetNS(a.NetNS); err != nil {
			return err
		}
	}
	if err := setLimits(a.ResourceLimits); err != nil {
		return err
	}
	if err := setupCgroups(mounts, a); err != nil {
		return fmt.Errorf("jailer: %w", err)
	}
	if err := pivotInto(root); err != nil {
		return fmt.Errorf("jailer: enter jail %s: %w", root, err)
	}
	for _, d := range jailDirs {
		if err := ownedDir(d, a.UID, a.GID); err != nil {
			return err
		}
	}
	devs := []device{
		{path: "/dev/net/tun", major: miscMajor, minor: tunMinor},
		{path: "/dev/urandom", major: 1, minor: 9, optional: true},
	}
	if kvmErr == nil {
		devs = append(devs, device{path: "/dev/kvm", major: miscMajor, minor: kvmMinor})
	}
	if uffdErr == nil {
		// The VMM runs unprivileged: userfaultfd(2) from user space sees
		// no kernel-mode faults unless vm.unprivileged_userfaultfd is on,
		// and UFFD_USER_MODE_ONLY would miss a write(2) from guest memory
		// (a Full snapshot). The device gives full userfaultfds to whoever
		// may open it: only this VM's uid, inside this jail.
		devs = append(devs, device{path: "/dev/userfaultfd", major: miscMajor, minor: uffdMinor})
	}
	for _, d := range devs {
		if err := mknodOwned(d, a.UID, a.GID); err != nil {
			if !d.optional {
				return err
			}
			if opt.Warn != nil {
				fmt.Fprintf(opt.Warn, "jailer: warning: %v\n", err)
			}
		}
	}
	pidFile := "/" + name + ".pid"
	if err := writePidFile(pidFile); err != nil {
		return err
	}

	argv := []string{"/" + name, "--id", a.ID,
		"--start-time-us", strconv.FormatInt(start.UnixMicro(), 10),
		"--start-time-cpu-us", strconv.FormatInt(startCPU, 10),
		"--parent-cpu-time-us", strconv.FormatInt(cpuTimeUS()-startCPU, 10)}
	argv = append(argv, a.VMMArgs...)
	// Drop privileges last: groups first, then gid, then uid (after which
	// none of these calls would be allowed). Only on this thread, with raw
	// syscalls: credentials are per thread in Linux, exec hands the new
	// program this thread's, and the other threads end at the exec. (Go's
	// syscall.Setuid changes every thread of the process, stopping each
	// one, which costs more than the rest of the jail together.)
	if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, 0, 0, 0); e != 0 {
		return fmt.Errorf("jailer: setgroups: %w", e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, uintptr(a.GID), uintptr(a.GID), uintptr(a.GID)); e != 0 {
		return fmt.Errorf("jailer: setresgid %d: %w", a.GID, e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(a.UID), uintptr(a.UID), uintptr(a.UID)); e != 0 {
		return fmt.Errorf("jailer: setresuid %d: %w", a.UID, e)
	}
	err = syscall.Exec(argv[0], argv, []string{})
	return fmt.Errorf("jailer: exec %s in %s: %w", argv[0], root, err)
}

// canonicalExec resolves execFile to the regular file it names.
func canonicalExec(execFile string) (string, error) {
	p, err := filepath.Abs(execFile)
	if err == nil {
		p, err = filepath.EvalSymlinks(p)
	}
	if err != nil {
		return "", fmt.Errorf("jailer: --exec-file %s: %w", execFile, err)
	}
	st, err := os.Stat(p)
	if err != nil {
		return "", fmt.Errorf("jailer: --exec-file %s: %w", execFile, err)
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("jailer: --exec-file %s is not a regular file", p)
	}
	return p, nil
}

// placeExec puts the exec file at dst. Hardlinked (unless copy), when the
// source is root's and writable by nobody else: the VMM can then run it but
// never change it, and every VMM shares its page cache. Otherwise copied
// and given to the VM's uid, as the real jailer does (its threat model
// wants no memory shared between VMMs, which the benchmark prices).
func placeExec(src, dst string, uid, gid int, copyExec bool) error {
	if err := os.Remove(dst); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("jailer: remove old %s: %w", dst, err)
	}
	if !copyExec {
		st, err := os.Stat(src)
		if err != nil {
			return fmt.Errorf("jailer: %w", err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		if sys.Uid == 0 && st.Mode().Perm()&0o022 == 0 {
			if err := os.Link(src, dst); err == nil {
				return nil
			}
			// EXDEV (another filesystem) or EPERM: copy instead.
		}
	}
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("jailer: %w", err)
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return fmt.Errorf("jailer: %w", err)
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, st.Mode().Perm())
	if err != nil {
		return fmt.Errorf("jailer: copy exec file: %w", err)
	}
	if err := out.Chown(uid, gid); err != nil {
		out.Close()
		return fmt.Errorf("jailer: chown %s: %w", dst, err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("jailer: copy %s to %s: %w", src, dst, err)
	}
	// The chown cleared any set-id bit; the mode is the source's.
	if err := out.Chmod(st.Mode().Perm()); err != nil {
		out.Close()
		return fmt.Errorf("jailer: chmod %s: %w", dst, err)
	}
	return out.Close()
}

// miscMinor finds a misc device's minor number in /proc/misc.
func miscMinor(procMisc, name string) (uint32, error) {
	f, err := os.Open(procMisc)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 2 && fields[1] == name {
			n, err := strconv.ParseUint(fields[0], 10, 32)
			return uint32(n), err
		}
	}
	return 0, fmt.Errorf("%s: no %s device", procMisc, name)
}

// joinNetNS moves this thread into the network namespace at path.
func joinNetNS(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("jailer: --netns: %w", err)
	}
	defer f.Close()
	if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("jailer: join netns %s: %w", path, err)
	}
	return nil
}

// setLimits applies --resource-limit (no-file 2048 unless given).
func setLimits(limits []string) error {
	set := map[string]uint64{LimitNoFile: defaultNoFile}
	for _, l := range limits {
		name, n, err := parseResourceLimit(l)
		if err != nil {
			return err
		}
		set[name] = n
	}
	for name, n := range set {
		res := syscall.RLIMIT_NOFILE
		if name == LimitFsize {
			res = syscall.RLIMIT_FSIZE
		}
		// syscall.Setrlimit, not unix's: the Go runtime then knows the
		// limit was set on purpose and does not restore its own at exec.
		if err := syscall.Setrlimit(res, &syscall.Rlimit{Cur: n, Max: n}); err != nil {
			return fmt.Errorf("jailer: set %s limit %d: %w", name, n, err)
		}
	}
	return nil
}

// pivotInto makes root this thread's root in a new mount namespace: a
// private copy of the mounts, root bind-mounted on itself, pivot_root,
// the old root detached and removed, chroot for good measure.
func pivotInto(root string) error {
	if err := unix.Unshare(unix.CLONE_NEWNS | unix.CLONE_FS); err != nil {
		return fmt.Errorf("unshare mount namespace: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_PRIVATE|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	if err := unix.Mount(root, root, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount: %w", err)
	}
	if err := unix.Chdir(root); err != nil {
		return err
	}
	const oldRoot = "old_root"
	if err := unix.Mkdir(oldRoot, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("mkdir old_root: %w", err)
	}
	if err := unix.PivotRoot(".", oldRoot); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Unmount(oldRoot, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach old root: %w", err)
	}
	if err := unix.Rmdir(oldRoot); err != nil {
		return fmt.Errorf("remove old_root: %w", err)
	}
	return unix.Chroot(".")
}

// ownedDir creates dir (inside the jail) 0700 and gives it to uid:gid.
func ownedDir(dir string, uid, gid int) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("jailer: create %s: %w", dir, err)
	}
	if err := unix.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("jailer: chmod %s: %w", dir, err)
	}
	if err := unix.Lchown(dir, uid, gid); err != nil {
		return fmt.Errorf("jailer: chown %s: %w", dir, err)
	}
	return nil
}

// mknodOwned creates a character device node 0600 owned by uid:gid. A node
// already there is an error, as with the real jailer: whoever reuses a jail
// clears it first.
func mknodOwned(d device, uid, gid int) error {
	if err := unix.Mknod(d.path, unix.S_IFCHR|0o600, int(unix.Mkdev(d.major, d.minor))); err != nil {
		return fmt.Errorf("jailer: mknod %s: %w", d.path, err)
	}
	if err := unix.Lchown(d.path, uid, gid); err != nil {
		return fmt.Errorf("jailer: chown %s: %w", d.path, err)
	}
	return nil
}

// writePidFile records this process's pid (which the VMM keeps across the
// exec) in the jail, as the real jailer does.
func writePidFile(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o644)
	if err != nil {
		return fmt.Errorf("jailer: pid file: %w", err)
	}
	_, err = f.WriteString(strconv.Itoa(os.Getpid()))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("jailer: pid file: %w", err)
	}
	return nil
}

// cpuTimeUS is the process's CPU time so far, in microseconds.
func cpuTimeUS() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_PROCESS_CPUTIME_ID, &ts); err != nil {
		return 0
	}
	return ts.Nano() / 1000
}
