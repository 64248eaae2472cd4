// Package dirrecord keeps a small record in a directory's own metadata: a
// versioned JSON value in one extended attribute of the trusted namespace
// (trusted.forkd.record), which only a process with CAP_SYS_ADMIN can read
// or write, so a jailed VMM that owns files inside the directory can
// neither read nor forge it.
//
// Why: an extended attribute is metadata, so it becomes durable with the
// directory itself. A directory made under a temp name, given its record,
// and then renamed into place carries the record across a power cut by the
// same fsync that makes the rename durable (on XFS and ext4, whose logs are
// ordered, by the fsync of the parent; on btrfs, by the fsync of the
// directory itself, which logs its attributes). A database row written
// without an fsync may be lost by that cut; the record is what a fork's
// directory says about itself when its row was lost (instance's
// reconciler).
//
// The package knows nothing of VMs: it stores and returns bytes under a
// kind and a version. It never follows a symlink: the directory is opened
// with O_NOFOLLOW and the attribute is read and written through that
// handle.
package dirrecord
