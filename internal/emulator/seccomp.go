package emulator

import (
	"fmt"

	seccomp "github.com/elastic/go-seccomp-bpf"
	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/sys/unix"
)

// The VMM's seccomp filter, installed before the API socket serves its
// first request, as Firecracker installs its own: deny by default, and a
// syscall outside the list kills the whole process with SIGSYS
// (SECCOMP_RET_KILL_PROCESS), so the manager can tell a violation from
// every other death by the signal alone. One filter covers every thread:
// the Go runtime runs goroutines on many threads and starts more at any
// time, so the filter is installed with SECCOMP_FILTER_FLAG_TSYNC and
// inherited by threads created later.
//
// The list is what this process needs and nothing more: the Go runtime
// (and the race detector's, which the tests run under), files inside the
// jail (snapshots, drives, the log), Unix sockets (the API and the uffd
// handshake), userfaultfd, and the TAP's ioctls. Left out on purpose: every
// way to run another program or create a process (execve, fork; clone
// only with CLONE_THREAD), to leave the jail or change identity (mount,
// chroot, setns, unshare, setuid…), to reach the network other than
// through a TAP (sockets other than AF_UNIX and route netlink), ptrace, bpf, perf, keys,
// modules.

// allowedSyscalls may be called with any arguments. Names an
// architecture lacks are dropped (the list is x86-64's, and arm64 has the
// *at forms only).
var allowedSyscalls = []string{
	// Go runtime: memory, threads, signals, scheduling, time.
	"brk", "mmap", "munmap", "mprotect", "madvise", "mremap", "mincore",
	"futex", "sched_yield", "sched_getaffinity", "nanosleep", "clock_gettime",
	"clock_nanosleep", "clock_getres", "gettimeofday",
	"rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
	"gettid", "getpid", "getppid", "tgkill", "tkill",
	"exit", "exit_group", "restart_syscall",
	"set_robust_list", "get_robust_list", "rseq", "set_tid_address", "arch_prctl",
	"getrandom", "uname", "getrlimit", "prlimit64", "getuid", "geteuid",
	"getgid", "getegid", "getrusage", "membarrier",
	// The netpoller and descriptors.
	"epoll_create1", "epoll_ctl", "epoll_pwait", "epoll_pwait2", "epoll_wait",
	"eventfd2", "pipe2", "poll", "ppoll", "close", "dup", "dup3", "fcntl",
	// Files (all inside the jail): snapshots, drives, the log.
	"read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
	"lseek", "openat", "open", "fstat", "newfstatat", "stat", "lstat", "statx",
	"openat2", // --confine-paths resolves with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS
	"fstatfs", "statfs", "fsync", "fdatasync", "ftruncate", "fallocate",
	"renameat", "renameat2", "rename", "unlinkat", "unlink", "mkdirat",
	"getdents64", "readlinkat", "faccessat", "faccessat2", "access",
	"copy_file_range", "sendfile", "fchmod", "fadvise64", "getcwd",
	// Unix sockets: the API server and the uffd handshake.
	"bind", "listen", "accept4", "connect", "getsockname", "getpeername",
	"setsockopt", "getsockopt", "sendmsg", "recvmsg", "sendto", "recvfrom",
	"shutdown",
	// Guest memory on a Uffd load.
	"userfaultfd",
	// ioctl: the TAP (TUNSETIFF…), userfaultfd (UFFDIO_*), terminals.
	"ioctl",
}

// threadFlags are the flags every Go (and glibc) thread creation passes to
// clone; a clone without CLONE_THREAD would be a new process.
const threadFlags = unix.CLONE_VM | unix.CLONE_THREAD

// vmmPolicy is the filter's policy for the running architecture.
func vmmPolicy() (seccomp.Policy, error) {
	info, err := arch.GetInfo("")
	if err != nil {
		return seccomp.Policy{}, fmt.Errorf("seccomp: %w", err)
	}
	var names []string
	for _, n := range allowedSyscalls {
		if _, ok := info.SyscallNames[n]; ok {
			names = append(names, n)
		}
	}
	groups := []seccomp.SyscallGroup{{Names: names, Action: seccomp.ActionAllow}}
	groups = append(groups, seccomp.SyscallGroup{
		Action: seccomp.ActionAllow,
		NamesWithCondtions: []seccomp.NameWithConditions{
			// Threads only: CLONE_VM|CLONE_THREAD both set.
			{Name: "clone", Conditions: seccomp.ArgumentConditions{
				{Argument: 0, Operation: seccomp.BitsSet, Value: threadFlags}}},
			// Unix sockets only, and a route netlink socket: guestnet asks
			// whether a TAP exists before attaching (so that it never creates
			// one); unprivileged, the socket can read links, not change them.
			{Name: "socket", Conditions: seccomp.ArgumentConditions{
				{Argument: 0, Operation: seccomp.Equal, Value: unix.AF_UNIX}}},
			{Name: "socket", Conditions: seccomp.ArgumentConditions{
				{Argument: 0, Operation: seccomp.Equal, Value: unix.AF_NETLINK},
				{Argument: 2, Operation: seccomp.Equal, Value: unix.NETLINK_ROUTE}}},
		},
	})
	if _, ok := info.SyscallNames["clone3"]; ok {
		// clone3 passes its flags in memory, out of a filter's sight: make
		// it look absent, and glibc (under the race detector, cgo creates
		// threads with pthread_create) falls back to clone, checked above.
		groups = append(groups, seccomp.SyscallGroup{
			Names:  []string{"clone3"},
			Action: seccomp.ActionErrno | seccomp.Action(unix.ENOSYS),
		})
	}
	return seccomp.Policy{DefaultAction: seccomp.ActionKillProcess, Syscalls: groups}, nil
}

// installSeccomp puts the VMM filter on every thread of this process
// (no_new_privs first: an unprivileged process may only install a filter
// once it can gain no privilege by exec).
func installSeccomp() error {
	p, err := vmmPolicy()
	if err != nil {
		return err
	}
	if err := seccomp.LoadFilter(seccomp.Filter{
		NoNewPrivs: true,
		Flag:       seccomp.FilterFlagTSync,
		Policy:     p,
	}); err != nil {
		return fmt.Errorf("seccomp: install the VMM filter on every thread: %w", err)
	}
	return nil
}
