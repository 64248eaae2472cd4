package pager

import (
	"fmt"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Read-only shared mappings of mem-files, one per file, shared by the
// sessions that read it.
//
// Replay installs its runs straight from a mapping of the mem-file
// (prefetch.go), and a lone session's 2 MiB misses come from one too
// (mapped.go). Each session used to map the file itself, so every 4 KiB
// replay populated the page-table entries of its whole working set in the
// pager's address space again (MADV_POPULATE_READ, then a first read of
// each page): 16K entries per fork of a 64 MiB working set, and on a
// shadow-paged host each costs the hypervisor's work too; then it tore
// them down (BENCHMARKS.md). The forks of a snapshot share its mem-file's
// inode (hardlinks), so the pager maps each file once and the sessions
// reading it share that mapping: the first to read a page populates its
// entry, and the rest find it.
//
// Rules:
//
//  1. A mapping is unmapped only when no session holds it. A session takes
//     its reference before anything of it reads the mapping and drops it
//     when serve returns, after its reader and cold readers have stopped
//     and nothing installs any more. An address unmapped under a reader
//     could be mapped again by anything, and its bytes taken for the
//     file's.
//  2. A mapping is named by the file's inode (device and inode number) and
//     the size mapped. While it is mapped the inode is held, so its number
//     cannot name another file; and a shared mapping shows the file's bytes
//     as they are, exactly as a session's own mapping of it did. A file
//     whose size changed is mapped afresh at its new size.
//  3. The mapping is read only through readMapped (a file that shrank is
//     an error for one replay, never a SIGBUS of the pager) or as a copy
//     source (a fault there is EFAULT).
//
// A session holds its reference for its whole life, not just its replay:
// siblings started one after another (each while the earlier ones are
// live, as in a burst) then find the mapping populated.
type memMaps struct {
	// private, a test hook (Config.privateMemMaps): every reference is a
	// mapping of its own, as before sharing.
	private bool
	// unmapEarly, a test hook (Config.unmapSharedEarly), is the twin of
	// rule 1: dropping any reference unmaps the mapping, under the other
	// sessions holding it.
	unmapEarly bool

	mu   sync.Mutex
	maps map[fileMapID]*fileMap // guarded by mu
	live int                    // mappings made and not unmapped; guarded by mu
	held int                    // references held, over all mappings; guarded by mu
}

// fileMapID names a mapping: the inode and the size mapped (rule 2).
type fileMapID struct {
	dev, ino uint64
	size     int64
}

// fileMapIDOf names the mapping of the whole of a file, from its stat.
func fileMapIDOf(st os.FileInfo) fileMapID {
	sys := st.Sys().(*syscall.Stat_t)
	return fileMapID{dev: sys.Dev, ino: sys.Ino, size: st.Size()}
}

// fileMap is one read-only shared mapping of a mem-file.
type fileMap struct {
	id       fileMapID
	mem      []byte
	refs     int  // sessions holding it; guarded by memMaps.mu
	unmapped bool // unmapEarly's: unmapped already; guarded by memMaps.mu
}

func newMemMaps(private, unmapEarly bool) *memMaps {
	return &memMaps{private: private, unmapEarly: unmapEarly, maps: make(map[fileMapID]*fileMap)}
}

// acquire returns a reference to the mapping of the file id names (f,
// open for reading: id is f's, from the stat its session was opened
// with), mapping it if no session holds one. The caller drops it with
// release once nothing of it reads the mapping (rule 1).
func (m *memMaps) acquire(f *os.File, id fileMapID) (*fileMap, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if fm := m.maps[id]; fm != nil && !m.private {
		fm.refs++
		m.held++
		return fm, nil
	}
	// Mapped with mu held: a second session of the file waits for this
	// mapping rather than making its own (an mmap only reserves addresses).
	mem, err := unix.Mmap(int(f.Fd()), 0, int(id.size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map %s: %w", f.Name(), err)
	}
	fm := &fileMap{id: id, mem: mem, refs: 1}
	m.live++
	m.held++
	if !m.private {
		m.maps[id] = fm
	}
	return fm, nil
}

// release drops a reference from acquire; the last one unmaps the mapping.
func (m *memMaps) release(fm *fileMap) {
	m.mu.Lock()
	defer m.mu.Unlock()
	fm.refs--
	m.held--
	if (fm.refs > 0 && !m.unmapEarly) || fm.unmapped {
		return
	}
	unix.Munmap(fm.mem)
	fm.unmapped = true
	m.live--
	if m.maps[fm.id] == fm {
		delete(m.maps, fm.id)
	}
}

// counts are how many mappings are made and not unmapped, and how many
// references the sessions hold to them (for tests).
func (m *memMaps) counts() (mapped, held int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.live, m.held
}
