// Package hostpath opens the files a client names on the host (a VM's
// kernel and rootfs; later, image layouts) so that naming a file cannot be
// turned into reading one the client has no business reading.
//
// A client-named path must be absolute and name a regular file; it is never
// under /proc, /sys or /dev, never on a proc or sysfs filesystem, never
// inside forkd's data dir (another VM's memory, the database), and never
// reached through a symlink in any component. A caller that is remote (the
// TCP listener: a token holder, not root) may name only files under the
// directories of Policy.Allowed (`host_path_dirs`, default none).
//
// The file is opened once (openat2 with RESOLVE_NO_SYMLINKS, O_NOFOLLOW and
// O_NONBLOCK, so a FIFO swapped in cannot hang the open), the checks are made
// on the open handle, and the caller copies or clones from that handle: a
// path checked and then opened again could be swapped in between. hostpath
// never writes, and it keeps nothing open: the caller closes the file.
package hostpath
