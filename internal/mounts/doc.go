// Package mounts reads the kernel's mount table (/proc/<pid>/mountinfo)
// for whoever in forkd needs to know what is mounted where: the jail (the
// cgroup hierarchies), the doctor (through the jail), the benchmark (the
// device under a data dir) and loopfs (whether its mount point is still a
// mount). It reads the table once per call, as the kernel wrote it, and
// nothing else.
//
// # What reading it correctly takes
//
// The kernel writes a mount point, a filesystem's root, its type and its
// source with space, tab, newline and backslash as octal escapes (\040,
// \011, \012, \134), so that a line splits on spaces. A reader that splits
// and stops there misses every mount whose path holds one of them: a data
// dir "/srv/vm data" would not be mounted at all. Between the sixth field
// and the filesystem type come zero or more optional fields (shared:N,
// master:N, ...) and a lone "-": only the separator says where the type
// is. Both are done by github.com/moby/sys/mountinfo (the parser runc and
// containerd use); this package only chooses the file, keeps what forkd
// asks about, and answers the two questions forkd asks: which mount is at a
// directory, and which mount holds a path.
//
// A line longer than the parser reads (64 KiB: an overlay of hundreds of
// layers lists them all) is left out rather than failing the whole table:
// forkd never looks for such a mount.
//
// A later line at the same mount point covers the earlier one (the kernel
// lists mounts in the order they were made); both questions answer with
// the mount a path lookup would reach.
//
// # What this package must never do
//
// It never mounts, unmounts or changes anything, and it knows nothing of
// cgroups, loop devices or data dirs: its callers do.
package mounts
