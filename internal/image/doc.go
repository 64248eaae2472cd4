// Package image gives VMs their root filesystems from container images:
// `forkd run --image REF` and the `forkd image` commands end here.
//
// A reference names where the image comes from, in skopeo's transport
// syntax: a registry reference (Docker Hub by default; credentials from the
// Docker config file of the daemon's user), oci:PATH[:TAG] for an OCI image
// layout directory, or docker-archive:PATH for a `docker save` tarball. The
// platform's manifest (linux/<host arch> unless asked otherwise) is what
// identifies an image: its digest keys the image's directory, its record and
// every tag pointing at it.
//
// Pulling streams each layer, verified against its digest and its diff_id,
// into a private temp tree (package rootfs: whiteouts, opaque directories,
// hardlinks, devices, owners, modes and xattrs, never resolving a path out
// of the tree), then mkfs.ext4 -d makes a sparse ext4 image of it sized to
// the content plus headroom. Concurrent pulls of one digest share one
// download and one build.
//
// # On disk and in the journal
//
//	<data>/images/sha256-<hex>/rootfs.ext4   the image VMs clone (reflink, else sparse copy)
//	<data>/images/sha256-<hex>/image.json    its record, written before the rename
//	<data>/images/.tmp-sha256-<hex>/         a build in progress (tree/ holds the unpacked layers)
//
// A build is journalled as image-pull (subject: the digest): begun → built
// (temp dir complete and fsynced) → stored (renamed into place) → the record
// and tag are inserted in one transaction. After a crash, ReconcileEntry
// records an image that reached stored and removes anything earlier. Delete
// (image-delete) renames the dir aside, deletes the record, removes the dir,
// and is re-run after a crash.
//
// An image in use (an instance or snapshot records its digest) is never
// deleted: Delete checks under the digest's write lock, and Acquire holds
// the read lock while a VM's disk is cloned from it and recorded.
//
// The package knows no VMs: the manager asks it for an image's ext4 file
// and clones it.
package image
