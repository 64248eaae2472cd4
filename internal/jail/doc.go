// Package jail is everything about confining one VMM process: the
// jailer's command line (Firecracker's jailer contract, which `forkd
// jailer` implements and the driver builds for either jailer), the
// `forkd jailer` itself, and the cgroups a jailed VMM lives in.
//
// # The jailer contract
//
// A jailer is started as root with
//
//	--id ID --exec-file PATH --uid U --gid G [--chroot-base-dir DIR]
//	[--netns PATH] [--cgroup-version 1|2] [--cgroup FILE=VALUE]...
//	[--parent-cgroup REL] [--resource-limit fsize|no-file=N]... [-- VMM ARGS]
//
// and, in this order: checks its inputs; marks every descriptor above
// stderr close-on-exec and clears its environment; creates the jail root
// <chroot_base>/<exec_name>/<id>/root (exec_name = the base name of the
// canonical exec file); puts the exec file in it as /<exec_name>; joins the
// network namespace; sets the rlimits (no-file 2048 unless given); creates
// <cgroup mount>/<parent>/<id> for each controller a --cgroup names, writes
// the values and moves itself in; enters a new mount namespace and
// pivot_roots into the jail root; creates /dev, /dev/net and /run (0700,
// owned by the VM's uid) and the device nodes /dev/net/tun, /dev/kvm,
// /dev/urandom and /dev/userfaultfd (when the host kernel has it), each
// 0600 and owned by the VM's uid; writes its pid to /<exec_name>.pid; drops
// to the uid and gid (no supplementary groups) and execs /<exec_name> --id
// ID --start-time-us N --start-time-cpu-us N --parent-cpu-time-us N VMM
// ARGS. The jail root itself becomes the VM uid's, mode 0700: the VMM
// creates its API socket and snapshot files there.
//
// `forkd jailer` departs from Firecracker's in three ways: it hardlinks the
// exec file into the jail when it can (a root-owned, read-only inode the
// VMM cannot change; FORKD_JAILER_COPY_EXEC=1 copies as the real jailer
// does), it refuses --daemonize and --new-pid-ns (forkd keeps every VMM its
// own child, so that its exit status is known), and it moves the whole
// process (cgroup.procs) into a v1 cgroup, not one thread (tasks): a Go
// process has many.
//
// # What this package must never do
//
// It never decides policy (which uid, which limits, which namespace): the
// manager does. It never removes anything but a cgroup it is told to.
package jail
