package instance

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/hostpath"
	"github.com/forkd/forkd/internal/memfile"
)

// Who may write which inode: the jail's invariant, enforced here.
//
//   - An inode with more than one link (a mem-file a fork or the store
//     shares, a kernel, a disk until the disk guard unshares it at launch,
//     a stored snapshot's files) is sealed: root-owned,
//     mode 0444. A VMM may map and read it, never write it.
//   - An inode a VMM writes (its disk; its own mem-file base during a Diff,
//     after the unshare guard; the snapshot files it creates) belongs to
//     its uid and has exactly one link. giveToVMM refuses anything else.
//   - Only a sealed inode gets a second link (shareFrom): one that a VMM
//     could write is cloned instead. An inode is sealed only while no VMM
//     that could have opened it for writing lives (sealSnapDir runs after
//     the VMM's death; the daemon's own new inodes are sealed as made), so
//     no VMM holds a writable descriptor to a sealed inode either.
//
// A jailed VMM owns its guest dir (the jailer gives it the jail root), so
// every name in there is the VMM's to create, rename or replace with a
// symlink: the daemon opens what it reads there with no symlink anywhere
// below the instance's <id> level (hostpath.OpenBeneath), acts through the
// handle, and checks the file type; it removes and renames there by name
// only (never through a link).

// sealMode is a sealed inode's mode: read-only for everyone.
const sealMode = 0o444

// sealed reports whether st is a sealed inode: root's, writable by nobody.
func sealed(st *unix.Stat_t) bool {
	return st.Uid == 0 && st.Gid == 0 && st.Mode&0o222 == 0
}

// sealFile makes the file f has open root-owned and read-only.
func sealFile(f *os.File) error {
	if err := f.Chown(0, 0); err != nil {
		return fmt.Errorf("seal %s: %w", f.Name(), err)
	}
	if err := f.Chmod(sealMode); err != nil {
		return fmt.Errorf("seal %s: %w", f.Name(), err)
	}
	return nil
}

// sealPath seals a file the daemon made in a directory no VMM owns (a fork
// or a store snapshot being built).
func sealPath(path string) error {
	f, err := memfile.OpenSource(path)
	if err != nil {
		return fmt.Errorf("seal: %w", err)
	}
	defer f.Close()
	return sealFile(f)
}

// giveToVMM makes the regular file path, inside g's guest dir, its VMM's
// to write: owner uid, mode 0600. It must have exactly one link: an inode a
// VMM writes is that VM's alone (the caller runs the unshare guard first).
// allowShared skips the check for the unshare guard's twin test only
// (Config.DisableUnshareGuard). It returns the file's size.
func giveToVMM(what string, g guestdir.Guest, path string, uid int, allowShared bool) (int64, error) {
	f, err := hostpath.OpenBeneath(what, g.Jail, path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return giveFile(what, f, uid, allowShared)
}

func giveFile(what string, f *os.File, uid int, allowShared bool) (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, fmt.Errorf("%s %s: %w", what, f.Name(), err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return 0, fmt.Errorf("%s %s is not a regular file", what, f.Name())
	}
	if st.Nlink > 1 && !allowShared {
		return 0, fmt.Errorf("%s %s has %d links: a VMM may write only an inode no other name shares (never a file a fork or snapshot links)", what, f.Name(), st.Nlink)
	}
	if err := f.Chown(uid, uid); err != nil {
		return 0, fmt.Errorf("give %s %s to uid %d: %w", what, f.Name(), uid, err)
	}
	if err := f.Chmod(0o600); err != nil {
		return 0, fmt.Errorf("give %s %s to uid %d: %w", what, f.Name(), uid, err)
	}
	return st.Size, nil
}

// sealSnapDir seals one of a guest's snapshot dirs once no VMM may write it
// (standby, after its VMM is killed; the reconciler, for a Standby VM): its
// mem-file and vmstate become root-owned 0444, so forks and the store may
// link them, and the dir itself root's (0755). A dir or file that is not
// there is not an error.
func sealSnapDir(g guestdir.Guest, d guestdir.SnapDir) error {
	dir, err := hostpath.OpenDirBeneath("snapshot dir", g.Jail, d.Dir)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	defer dir.Close()
	for _, name := range []string{filepath.Base(d.Memory()), filepath.Base(d.VMState())} {
		fd, err := unix.Openat(int(dir.Fd()), name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) {
			continue
		}
		if err != nil {
			return fmt.Errorf("seal %s/%s: %w", d.Dir, name, err)
		}
		f := os.NewFile(uintptr(fd), filepath.Join(d.Dir, name))
		var st unix.Stat_t
		err = unix.Fstat(fd, &st)
		if err == nil && st.Mode&unix.S_IFMT != unix.S_IFREG {
			err = fmt.Errorf("seal %s: not a regular file", f.Name())
		}
		if err == nil {
			err = sealFile(f)
		}
		f.Close()
		if err != nil {
			return err
		}
	}
	if err := dir.Chown(0, 0); err != nil {
		return fmt.Errorf("seal %s: %w", d.Dir, err)
	}
	return dir.Chmod(0o755)
}

// openDataRoot opens the data dir for the files a fork or the store is to
// get: its Open opens one read-only, a regular file reached through no
// symlink below the data dir. A fork or a store snapshot opens its four
// files through one handle of it (the caller closes it), not four.
func (m *Manager) openDataRoot() (*hostpath.Root, error) {
	return hostpath.OpenRoot(m.layout.Root())
}

// sources is where shareFrom gets its source files: each opened anew
// through the data dir's handle (dataSources), or, for a batch of forks,
// each sealed one opened once and shared by every fork (sourceCache).
type sources interface {
	// source opens path read-only (what names it in errors) and stats it;
	// release gives the handle back.
	source(what, path string) (f *os.File, st *unix.Stat_t, release func(), err error)
}

// dataSources opens each source through the data dir's handle
// (openDataRoot).
type dataSources struct{ root *hostpath.Root }

func (d dataSources) source(what, path string) (*os.File, *unix.Stat_t, func(), error) {
	f, err := d.root.Open(what, path)
	if err != nil {
		return nil, nil, nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, nil, nil, err
	}
	return f, &st, func() { f.Close() }, nil
}

// sourceCache is dataSources for a batch of forks: a sealed source (one
// nothing writes: a fork only links it, through its descriptor) is opened
// and checked once and its handle shared by every fork of the batch until
// close; an unsealed one (a VMM may still write it) is opened anew for each
// fork, which copies it.
type sourceCache struct {
	dataSources
	mu     sync.Mutex
	sealed map[string]sealedSource // by path
}

type sealedSource struct {
	f  *os.File
	st *unix.Stat_t
}

func newSourceCache(root *hostpath.Root) *sourceCache {
	return &sourceCache{dataSources: dataSources{root}, sealed: map[string]sealedSource{}}
}

func (c *sourceCache) source(what, path string) (*os.File, *unix.Stat_t, func(), error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s, ok := c.sealed[path]; ok {
		return s.f, s.st, func() {}, nil
	}
	f, st, release, err := c.dataSources.source(what, path)
	if err != nil || !sealed(st) {
		return f, st, release, err
	}
	c.sealed[path] = sealedSource{f, st}
	return f, st, func() {}, nil
}

// close closes the shared handles.
func (c *sourceCache) close() {
	for _, s := range c.sealed {
		s.f.Close()
	}
}

// shareFrom gives dst, in a directory the daemon is building (a fork's or a
// store snapshot's), the file src: a hardlink when src is sealed (zero I/O,
// one inode and page cache for every sibling), else a new inode cloned from
// it (reflink first), which is sealed (a mem-file a VMM wrote while it may
// still live: a live fork or snapshot takes its running source's fresh
// base). durable says whether dst's directory is fsynced now (a store
// snapshot) or later with its tree (a fork: memfile's *Into functions).
// src is opened from srcs.
func (m *Manager) shareFrom(srcs sources, what, src, dst string, durable bool) (memfile.ShareResult, error) {
	f, st, release, err := srcs.source(what, src)
	if err != nil {
		return memfile.ShareResult{}, err
	}
	defer release()
	if sealed(st) {
		if durable {
			return m.files.ShareFileForFork(f, dst)
		}
		return m.files.ShareFileInto(f, dst)
	}
	var mode memfile.Mode
	if durable {
		mode, err = m.files.CloneFile(f, dst)
	} else {
		mode, err = m.files.CloneFileInto(f, dst)
	}
	if err != nil {
		return memfile.ShareResult{}, err
	}
	return memfile.ShareResult{Mode: mode}, sealPath(dst)
}

// sealStoreDir seals the files of store snapshot id (the reconciler: a
// store from before jails has them writable by root, and forks link only
// sealed inodes). The store is root's alone: no VMM ever names a path in
// it, so the files are reached by path (and never through a symlink).
func (m *Manager) sealStoreDir(id string) {
	sd, err := m.layout.Snapshot(id)
	if err != nil {
		return
	}
	for _, p := range []string{sd.Memory(), sd.VMState(), sd.Kernel(), sd.Rootfs(), sd.MemoryZst()} {
		f, err := memfile.OpenSource(p)
		if err != nil {
			continue // absent (a compressed snapshot's memory, no kernel)
		}
		var st unix.Stat_t
		if unix.Fstat(int(f.Fd()), &st) == nil && !sealed(&st) {
			if err := sealFile(f); err != nil {
				m.log.Warn("reconcile: seal a store snapshot's file", "snapshot", id, "err", err)
			}
		}
		f.Close()
	}
}
