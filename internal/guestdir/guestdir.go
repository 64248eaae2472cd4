// Package guestdir is the one place that knows every path under forkd's data
// directory (docs/architecture.md §4, a contract that tests and outside
// checks read):
//
//	<data>/forkd.db, <data>/forkd.sock
//	<data>/exec/<exec>                       the VMM's exec file, staged for jailers
//	<data>/jail/<exec>/<id>/vmm.log          root's: the VMM's output
//	<data>/jail/<exec>/<id>/root/            the guest dir, which is the jail root
//	    {vmm.sock, kernel, rootfs.ext4, <exec>, <exec>.pid, dev/, run/}
//	    snapshots/snapshot-{latest,base}/{vmstate,memory}
//	<data>/snapshots/<snapshot-id>/{vmstate,memory,memory.zst,meta.json,kernel?,rootfs.ext4}
//	<data>/pager/<version>/{control.sock,pager.pid,sessions/}
//	<data>/lost+found/{jail,guests,snapshots}/<entry>
//	<data>/prefetch/<cache-key>.ws
//	<data>/images/sha256-<hex>/{rootfs.ext4,image.json}
//
// <exec> is the name of the VMM's exec file as a jailer sees it (ExecEmulator
// or ExecFirecracker): a jailer builds its jail at
// <chroot_base>/<exec>/<id>/root, and with chroot_base <data>/jail that jail
// root is the guest dir itself, so a jailed VMM's files need no extra link
// (an extra link would hold every mem-file at nlink >= 2 for good). The
// <id> level is root's: it holds the jail root and the VMM's log, which
// must never lie in a directory the VMM owns. <data>/guests/<id>/ is the
// layout before jails (LegacyGuestsDir): the manager migrates it at start.
//
// No other package joins path segments under the data dir. Every id and
// version is validated here, so no path built from a request can escape the
// data directory. guestdir does no I/O except where a method says so.
package guestdir

import (
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
)

// MaxSocketPath is the longest unix socket path the kernel accepts
// (sizeof(sun_path) = 108, including the terminating NUL).
const MaxSocketPath = 107

// Names of the files and directories inside a guest or snapshot dir.
const (
	dbName        = "forkd.db"
	sockName      = "forkd.sock"
	guestsName    = "guests"
	jailName      = "jail"
	execDirName   = "exec"
	jailRootName  = "root"
	snapshotsName = "snapshots"
	pagerName     = "pager"
	lostFoundName = "lost+found"
	prefetchName  = "prefetch"
	workingSetExt = ".ws"
	imagesName    = "images"
	imageMetaName = "image.json"
	imageTreeName = "tree"

	vmmSockName   = "vmm.sock"
	vsockName     = "v.sock"
	vmmLogName    = "vmm.log"
	devName       = "dev"
	runName       = "run"
	pidSuffix     = ".pid"
	kernelName    = "kernel"
	rootfsName    = "rootfs.ext4"
	latestName    = "snapshot-latest"
	baseName      = "snapshot-base"
	vmstateName   = "vmstate"
	memoryName    = "memory"
	memoryZstName = "memory.zst"
	mappedPinName = "memory.mapped"
	metaName      = "meta.json"

	// TempPrefix starts the name of every directory under jail/<exec>/ or
	// snapshots/ that is being built and not yet renamed into place. The
	// reconciler removes such directories left by a crash.
	TempPrefix = ".tmp-"
	// deletingSuffix ends the temp name a directory is renamed to before it
	// is removed.
	deletingSuffix = ".deleting"
	// PoolPrefix starts the name of an empty fork tree made ahead for a
	// fork id no fork has yet (forktree's pool): no VM's, never carrying a
	// file until a fork takes it, and removed by the reconciler.
	PoolPrefix = ".pool-"
)

// forkdIDPattern is the shape of the ids forkd generates for instances and
// snapshots: 24 lowercase hex digits (96 random bits).
var forkdIDPattern = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[0-9a-f]{24}$`) })

// IsForkdID reports whether s has the shape of an id forkd generates.
func IsForkdID(s string) bool { return forkdIDPattern().MatchString(s) }

// Exec names: the file name a jailer gives the VMM's exec file, which is
// also a directory level of every jail (<data>/jail/<exec>/<id>/root). They
// are fixed, whatever the file a user points forkd at is called, so a
// Firecracker release's file name never moves a VM's directory.
const (
	ExecEmulator    = "forkd-vmm"   // forkd's own binary run as its VMM (argv[0] dispatch)
	ExecFirecracker = "firecracker" // a real Firecracker
)

// TempID parses a directory entry name under jail/<exec>/ or snapshots/ that
// follows forkd's own temp patterns, ".tmp-<id>" (being built) or
// ".tmp-<id>.deleting" (being removed), with id a forkd id. Any other name,
// even one starting with ".tmp-", is not forkd's.
func TempID(name string) (id string, ok bool) {
	rest, ok := strings.CutPrefix(name, TempPrefix)
	if !ok {
		return "", false
	}
	rest = strings.TrimSuffix(rest, deletingSuffix)
	if !IsForkdID(rest) {
		return "", false
	}
	return rest, true
}

// PooledID parses a directory entry name under jail/<exec>/ that names a
// pooled fork tree, ".pool-<id>" with id a forkd id.
func PooledID(name string) (id string, ok bool) {
	rest, ok := strings.CutPrefix(name, PoolPrefix)
	if !ok || !IsForkdID(rest) {
		return "", false
	}
	return rest, true
}

// idPattern is what ids and names used in paths look like: no dots, no
// slashes, so an id can never be "..", a hidden temp name or a sub-path.
var idPattern = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`) })

// versionPattern allows the dots of a semver but never a path separator or "..".
var versionPattern = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$`) })

// ValidID reports whether id can name a guest or snapshot directory.
func ValidID(id string) error {
	if !idPattern().MatchString(id) {
		return fmt.Errorf("invalid id %q: want 1-64 of [A-Za-z0-9_-], not starting with - or _", id)
	}
	return nil
}

// Layout is the data directory. The zero value is not usable; use New.
type Layout struct {
	root string
	exec string // the exec name guests live under (jail/<exec>/)
}

// New returns the layout rooted at dataDir (made absolute and cleaned), with
// guests under the emulator's exec name; WithExec chooses another.
func New(dataDir string) (Layout, error) {
	if dataDir == "" {
		return Layout{}, fmt.Errorf("guestdir: empty data dir")
	}
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		return Layout{}, fmt.Errorf("guestdir: data dir %s: %w", dataDir, err)
	}
	return Layout{root: abs, exec: ExecEmulator}, nil
}

// WithExec is the layout whose guests live under jail/<exec>/: the exec
// name of the VMM the daemon runs (ExecEmulator or ExecFirecracker).
func (l Layout) WithExec(exec string) (Layout, error) {
	if err := ValidID(exec); err != nil {
		return Layout{}, fmt.Errorf("guestdir: exec name: %w", err)
	}
	l.exec = exec
	return l, nil
}

// Exec is the exec name guests live under.
func (l Layout) Exec() string { return l.exec }

// Root is the data directory.
func (l Layout) Root() string { return l.root }

// DB is the SQLite database.
func (l Layout) DB() string { return filepath.Join(l.root, dbName) }

// Socket is the daemon's default API socket.
func (l Layout) Socket() string { return filepath.Join(l.root, sockName) }

// JailBase is <data>/jail: the jailers' --chroot-base-dir.
func (l Layout) JailBase() string { return filepath.Join(l.root, jailName) }

// JailsDir is <data>/jail/<exec>: one entry per instance (its id, or a
// temp name while it is built or deleted).
func (l Layout) JailsDir() string { return filepath.Join(l.JailBase(), l.exec) }

// JailsDirOf is the JailsDir of another exec name (a data dir a daemon
// running the other VMM kind used).
func (l Layout) JailsDirOf(exec string) (string, error) {
	if err := ValidID(exec); err != nil {
		return "", fmt.Errorf("guestdir: exec name: %w", err)
	}
	return filepath.Join(l.JailBase(), exec), nil
}

// ExecDir holds the staged exec files jailers take the VMM from.
func (l Layout) ExecDir() string { return filepath.Join(l.root, execDirName) }

// StagedExec is the staged exec file of this layout's VMM: its base name is
// the exec name, which names the jail directory level.
func (l Layout) StagedExec() string { return filepath.Join(l.ExecDir(), l.exec) }

// LegacyGuestsDir is <data>/guests: where guest dirs lived before jails
// (one <id>/ per instance, the VMM's log in <id>/logs/vmm.log). The manager
// moves what it finds there into JailsDir at start.
func (l Layout) LegacyGuestsDir() string { return filepath.Join(l.root, guestsName) }

// SnapshotsDir is the immutable snapshot store.
func (l Layout) SnapshotsDir() string { return filepath.Join(l.root, snapshotsName) }

// LostFound is where the reconciler moves what it finds under jail/<exec>/,
// snapshots/ or a legacy guests/ and cannot prove it made:
// <data>/lost+found/{jail,snapshots,guests}/.
func (l Layout) LostFound() string { return filepath.Join(l.root, lostFoundName) }

// LostFoundEntry is the n-th candidate name in lost+found for the entry
// name found in dir (a JailsDir, SnapshotsDir or LegacyGuestsDir):
// lost+found/<jail|snapshots|guests>/<name>, then <name>.1, <name>.2...
// (the caller takes the first that is free).
func (l Layout) LostFoundEntry(dir, name string, n int) (string, error) {
	var kind string
	switch {
	case filepath.Dir(dir) == l.JailBase() && ValidID(filepath.Base(dir)) == nil:
		kind = jailName
	case dir == l.SnapshotsDir():
		kind = snapshotsName
	case dir == l.ImagesDir():
		kind = imagesName
	case dir == l.LegacyGuestsDir():
		kind = guestsName
	default:
		return "", fmt.Errorf("guestdir: lost+found: %s is not jail/<exec>/, snapshots/, images/ or guests/", dir)
	}
	if name == "" || name == "." || name == ".." || strings.ContainsRune(name, '/') {
		return "", fmt.Errorf("guestdir: lost+found: invalid entry name %q", name)
	}
	if n > 0 {
		name = fmt.Sprintf("%s.%d", name, n)
	}
	return filepath.Join(l.LostFound(), kind, name), nil
}

// PagerRoot holds one directory per pager version.
func (l Layout) PagerRoot() string { return filepath.Join(l.root, pagerName) }

// PagerDir is the directory of the pager of one version.
func (l Layout) PagerDir(version string) (string, error) {
	if !versionPattern().MatchString(version) || strings.Contains(version, "..") {
		return "", fmt.Errorf("guestdir: invalid pager version %q", version)
	}
	return filepath.Join(l.PagerRoot(), version), nil
}

// PrefetchDir holds the working-set recordings, one per snapshot cache key.
func (l Layout) PrefetchDir() string { return filepath.Join(l.root, prefetchName) }

// WorkingSet is the working-set recording of the mem-file bytes a snapshot
// cache key names (internal/prefetch): forks share their key, so the first
// restore of any of them records for all.
func (l Layout) WorkingSet(cacheKey string) (string, error) {
	if err := ValidID(cacheKey); err != nil {
		return "", fmt.Errorf("guestdir: working set: cache key: %w", err)
	}
	return filepath.Join(l.PrefetchDir(), cacheKey+workingSetExt), nil
}

// WorkingSetKey returns the cache key a name in PrefetchDir records, and
// false for any other name (temp files among them).
func WorkingSetKey(name string) (string, bool) {
	key, ok := strings.CutSuffix(name, workingSetExt)
	if !ok || ValidID(key) != nil {
		return "", false
	}
	return key, true
}

// Guest is the directory of one instance: jail/<exec>/<id>, whose root/ is
// the guest dir.
func (l Layout) Guest(id string) (Guest, error) {
	if err := ValidID(id); err != nil {
		return Guest{}, fmt.Errorf("guestdir: guest: %w", err)
	}
	return l.guestAt(filepath.Join(l.JailsDir(), id)), nil
}

func (l Layout) guestAt(jail string) Guest {
	return Guest{Jail: jail, Dir: filepath.Join(jail, jailRootName), Exec: l.exec}
}

// TempGuest is where a fork or create of id is built before its Jail is
// renamed to Guest(id)'s.
func (l Layout) TempGuest(id string) (Guest, error) { return l.prefixedGuest(TempPrefix, id) }

// PooledGuest is where the empty tree made ahead for a fork of id lies
// (forktree's pool); a fork that takes it builds there instead of in its
// TempGuest, and renames its Jail to Guest(id)'s the same way.
func (l Layout) PooledGuest(id string) (Guest, error) { return l.prefixedGuest(PoolPrefix, id) }

// prefixedGuest is a guest tree of id under jail/<exec>/ named prefix+id
// (id checked as Guest checks it).
func (l Layout) prefixedGuest(prefix, id string) (Guest, error) {
	if _, err := l.Guest(id); err != nil {
		return Guest{}, err
	}
	return l.guestAt(filepath.Join(l.JailsDir(), prefix+id)), nil
}

// LegacyGuest is where instance id's guest dir lay before jails
// (<data>/guests/<id>), and its VMM's log inside it.
func (l Layout) LegacyGuest(id string) (dir, log string, err error) {
	if err := ValidID(id); err != nil {
		return "", "", fmt.Errorf("guestdir: guest: %w", err)
	}
	dir = filepath.Join(l.LegacyGuestsDir(), id)
	return dir, filepath.Join(dir, "logs", vmmLogName), nil
}

// Snapshot is the store directory of one snapshot.
func (l Layout) Snapshot(id string) (SnapDir, error) {
	if err := ValidID(id); err != nil {
		return SnapDir{}, fmt.Errorf("guestdir: snapshot: %w", err)
	}
	return SnapDir{Dir: filepath.Join(l.SnapshotsDir(), id)}, nil
}

// TempSnapshot is where snapshot id is built before it is renamed into place.
func (l Layout) TempSnapshot(id string) (SnapDir, error) {
	if err := ValidID(id); err != nil {
		return SnapDir{}, fmt.Errorf("guestdir: snapshot: %w", err)
	}
	return SnapDir{Dir: filepath.Join(l.SnapshotsDir(), TempPrefix+id)}, nil
}

// DeletingGuest is where a guest's Jail is renamed before it is removed, so
// a crash never leaves a half-removed dir under the instance's own name.
func (l Layout) DeletingGuest(id string) (string, error) {
	t, err := l.TempGuest(id)
	return t.Jail + deletingSuffix, err
}

// DeletingSnapshot is DeletingGuest for the snapshot store.
func (l Layout) DeletingSnapshot(id string) (string, error) {
	t, err := l.TempSnapshot(id)
	return t.Dir + deletingSuffix, err
}

// ImagesDir holds one directory per image, named after its manifest digest.
func (l Layout) ImagesDir() string { return filepath.Join(l.root, imagesName) }

// digestPattern is the only digest form images are stored under.
var digestPattern = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^sha256:[0-9a-f]{64}$`) })

// ValidDigest reports whether d is a sha256 digest ("sha256:" + 64 hex).
func ValidDigest(d string) error {
	if !digestPattern().MatchString(d) {
		return fmt.Errorf("invalid image digest %q: want sha256:<64 hex digits>", d)
	}
	return nil
}

// imageDirName is "sha256-<hex>": a digest without the colon.
func imageDirName(digest string) (string, error) {
	if err := ValidDigest(digest); err != nil {
		return "", fmt.Errorf("guestdir: image: %w", err)
	}
	return strings.Replace(digest, ":", "-", 1), nil
}

// Image is the directory of the image with this manifest digest.
func (l Layout) Image(digest string) (ImageDir, error) {
	n, err := imageDirName(digest)
	return ImageDir{Dir: filepath.Join(l.ImagesDir(), n)}, err
}

// TempImage is where an image is built before it is renamed into place.
func (l Layout) TempImage(digest string) (ImageDir, error) {
	n, err := imageDirName(digest)
	return ImageDir{Dir: filepath.Join(l.ImagesDir(), TempPrefix+n)}, err
}

// DeletingImage is where an image dir is renamed before it is removed.
func (l Layout) DeletingImage(digest string) (string, error) {
	t, err := l.TempImage(digest)
	return t.Dir + deletingSuffix, err
}

// ImageDigestOf is the digest an entry name under ImagesDir stands for, or
// "" for a name that is not an image dir's.
func ImageDigestOf(name string) string {
	d := strings.Replace(name, "-", ":", 1)
	if ValidDigest(d) != nil {
		return ""
	}
	return d
}

// TempImageDigest parses forkd's temp names under ImagesDir,
// ".tmp-sha256-<hex>" (being built) and ".tmp-sha256-<hex>.deleting" (being
// removed), into the digest. Any other name is not forkd's.
func TempImageDigest(name string) (digest string, ok bool) {
	rest, ok := strings.CutPrefix(name, TempPrefix)
	if !ok {
		return "", false
	}
	d := ImageDigestOf(strings.TrimSuffix(rest, deletingSuffix))
	return d, d != ""
}

// ImageDir is one image's directory.
type ImageDir struct {
	Dir string
}

// Rootfs is the image's ext4 root filesystem, which VMs clone.
func (d ImageDir) Rootfs() string { return filepath.Join(d.Dir, rootfsName) }

// Meta is the image's record as JSON, written before the dir is renamed
// into place so a crash between rename and record can be finished.
func (d ImageDir) Meta() string { return filepath.Join(d.Dir, imageMetaName) }

// Tree is where a temp image dir unpacks the layers before mkfs.
func (d ImageDir) Tree() string { return filepath.Join(d.Dir, imageTreeName) }

// IsTemp reports whether a directory entry name under guests/ or snapshots/
// is a half-built directory.
// IsTemp reports whether a directory entry name under jail/<exec>/ or
// snapshots/ is a half-built directory.
func IsTemp(name string) bool { return strings.HasPrefix(name, TempPrefix) }

// Guest is one instance's directories.
type Guest struct {
	// Jail is jail/<exec>/<id>: root's, holding Dir and the VMM's log. It
	// is the unit that is built, renamed and removed.
	Jail string
	// Dir is the guest dir, Jail/root: the instance's files, the VMM's
	// working directory and, jailed, its root. A jailed VMM owns it (the
	// jailer gives it the VM's uid), so every name in it is VM-controlled:
	// the daemon never follows a symlink there and checks what it opens.
	Dir string
	// Exec is the exec name (a jailer's <exec_name>).
	Exec string
}

func (g Guest) VMMSock() string { return filepath.Join(g.Dir, vmmSockName) }

// VMMLog is the VMM's stdout and stderr: beside the guest dir, never in it,
// so the VMM cannot swap it for a link the daemon would then append to.
func (g Guest) VMMLog() string { return filepath.Join(g.Jail, vmmLogName) }
func (g Guest) Kernel() string { return filepath.Join(g.Dir, kernelName) }
func (g Guest) Rootfs() string { return filepath.Join(g.Dir, rootfsName) }

// DevDir and RunDir are what a jailer makes in the jail root (device nodes,
// Firecracker's run dir); ExecLink and PidFile are the exec file it places
// there and the pid file it writes. The manager clears the first two before
// each jailed launch (a jailer refuses a device node already there).
func (g Guest) DevDir() string   { return filepath.Join(g.Dir, devName) }
func (g Guest) RunDir() string   { return filepath.Join(g.Dir, runName) }
func (g Guest) ExecLink() string { return filepath.Join(g.Dir, g.Exec) }
func (g Guest) PidFile() string  { return filepath.Join(g.Dir, g.Exec+pidSuffix) }

// InVMM is path as the guest's VMM names it: relative to the guest dir,
// which is the VMM's working directory and, in a jail, its root. So a
// fork's VMM, working in the fork's dir, opens the fork's own files, and
// the same request serves a jailed and an unjailed VMM. A path outside the
// guest dir (an unjailed VM's kernel elsewhere on the host) is returned as
// is.
func (g Guest) InVMM(path string) string {
	rel, err := filepath.Rel(g.Dir, path)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") || filepath.IsAbs(rel) {
		return path
	}
	return rel
}

// RootfsRel is the rootfs path relative to the guest dir, which is the
// VMM's working directory. The driver passes this relative path, so the
// vmstate records it and a fork's VMM (working in the fork's dir) opens the
// fork's own disk, not its source's (which may be gone).
func (g Guest) RootfsRel() string { return rootfsName }

// Vsock is the host end of the VM's vsock device (Firecracker's uds_path):
// a host connects here and sends "CONNECT <port>\n"; the guest's
// connection to host port P goes to Vsock() + "_P". The VMM binds it by
// its relative name, so no length limits the bind; a client whose path
// would pass MaxSocketPath connects through a shorter one (its dir's
// /proc/self/fd, or a chdir).
func (g Guest) Vsock() string { return filepath.Join(g.Dir, vsockName) }

// VsockRel is Vsock relative to the guest dir, which is how the driver
// gives it: the vmstate records the relative path, and a fork's VMM
// (working in the fork's dir) binds the fork's own socket on restore.
func (g Guest) VsockRel() string { return vsockName }

func (g Guest) SnapshotsDir() string {
	return filepath.Join(g.Dir, snapshotsName)
}

// Latest is snapshot-latest/: present exactly while the instance is Standby.
func (g Guest) Latest() SnapDir { return SnapDir{Dir: filepath.Join(g.SnapshotsDir(), latestName)} }

// Base is snapshot-base/: the retained diff base while the instance runs.
func (g Guest) Base() SnapDir { return SnapDir{Dir: filepath.Join(g.SnapshotsDir(), baseName)} }

// MappedPin is snapshots/memory.mapped: an extra link to the mem-file inode
// the instance's running VMM maps, kept while the unshare guard has renamed a
// private copy over the name that VMM was restored from (see
// instance.pinMapped). It lives in the snapshots dir, so stop and delete
// remove it with that dir.
func (g Guest) MappedPin() string { return filepath.Join(g.SnapshotsDir(), mappedPinName) }

// SnapDir is a directory holding one vmstate + mem-file pair: a guest's
// snapshot-latest/ or snapshot-base/, or a snapshot in the store.
type SnapDir struct {
	Dir string
}

func (s SnapDir) VMState() string   { return filepath.Join(s.Dir, vmstateName) }
func (s SnapDir) Memory() string    { return filepath.Join(s.Dir, memoryName) }
func (s SnapDir) MemoryZst() string { return filepath.Join(s.Dir, memoryZstName) }
func (s SnapDir) Meta() string      { return filepath.Join(s.Dir, metaName) }

// Kernel and Rootfs are the store's copies of a snapshot source's guest-dir
// kernel and disk (taken while the VM was paused, so the disk matches the
// memory); forks of the snapshot clone them. A guest's own snapshot dirs
// never hold them.
func (s SnapDir) Kernel() string { return filepath.Join(s.Dir, kernelName) }
func (s SnapDir) Rootfs() string { return filepath.Join(s.Dir, rootfsName) }
