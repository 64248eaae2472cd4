// Package rootfs turns the layers of a container image into an ext4 root
// filesystem for a VM, without mounting anything:
//
//  1. Tree.Apply unpacks each layer, in order, into a private directory the
//     way a container runtime applies layers: regular files, directories,
//     symlinks, hardlinks (also to files of lower layers), device nodes and
//     FIFOs, with owners, modes (setuid/setgid/sticky), xattrs and mtimes;
//     `.wh.NAME` whiteouts delete NAME from lower layers and `.wh..wh..opq`
//     empties a directory of everything lower layers put there.
//  2. MakeExt4 sizes an image to the tree's content plus headroom and runs
//     `mkfs.ext4 -d` (e2fsprogs 1.47.0 takes a directory, not a tar), which
//     copies the tree, holes included, into a sparse image file.
//  3. Grow enlarges a VM's clone of that image to the disk size it asked for
//     (resize2fs, offline).
//
// # Safety
//
// Layers are untrusted input and the unpacking runs as root (owners and
// device nodes need it). Every path of a layer is resolved with openat2 and
// RESOLVE_BENEATH from the tree's root: an entry whose name climbs out
// (`../x`), or whose parent resolves outside the tree through a symlink
// (absolute, or relative with too many `..`), is refused with ErrUnsafe and
// nothing is written outside the tree. Symlinks that stay inside (the `/bin
// -> usr/bin` of merged-/usr distributions) are followed as a runtime would.
// The final component of an entry is never followed: it is removed and
// created anew. Symlink targets themselves are data and are stored as given.
//
// The package knows nothing of registries, digests or forkd's data dir: it
// reads tar streams and writes into the directory it is given.
package rootfs
