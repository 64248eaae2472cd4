// Package uffd is forkd's userfaultfd syscall layer: opening a userfaultfd,
// the UFFDIO_* ioctls, decoding the 32-byte uffd_msg events, and both sides
// of Firecracker's handshake (a JSON region list plus the uffd passed with
// SCM_RIGHTS over a Unix socket).
//
// It uses golang.org/x/sys/unix with ABI numbers written out by hand
// (abi.go; checked against <linux/userfaultfd.h>), so no cgo is needed.
//
// The package knows no pager, no VM and no cache: it must never decide how a
// fault is served. Its one policy is safety: an FD refuses every operation
// after Close, and Close waits for in-flight ioctls, so an ioctl can never
// land on a recycled descriptor number that now names some other file.
package uffd
