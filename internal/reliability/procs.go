package reliability

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/forkd/forkd/internal/daemonproc"
)

// Proc is a live process whose command line names a path in a data dir.
type Proc = daemonproc.Process

// ProcessesUnder lists the live processes whose command line names a path
// under root (daemonproc.ProcessesUnder).
func ProcessesUnder(root string) []Proc { return daemonproc.ProcessesUnder(root) }

// Environ is a process's environment.
func Environ(pid int) ([]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		return nil, err
	}
	s := strings.TrimRight(string(b), "\x00")
	if s == "" {
		return nil, nil
	}
	return strings.Split(s, "\x00"), nil
}

// sharedWrites lists the files under root with more than one link that pid
// could write: open read-write or write-only, or mapped MAP_SHARED with
// write permission. forkd promises there are none (invariant 3 of
// docs/architecture.md §3: nobody writes a shared inode); MAP_PRIVATE mappings of a shared mem-file (the
// File restore backend) are fine, their writes never reach the file.
func sharedWrites(pid int, root string) []string {
	var out []string
	seen := map[string]bool{}
	note := func(path, how string) {
		if seen[path+how] {
			return
		}
		st, err := os.Stat(path)
		if err != nil || !st.Mode().IsRegular() {
			return
		}
		if n := nlink(st); n > 1 {
			seen[path+how] = true
			out = append(out, fmt.Sprintf("pid %d %s %s (nlink %d)", pid, how, path, n))
		}
	}
	fdDir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, _ := os.ReadDir(fdDir)
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
		if err != nil || !strings.HasPrefix(target, root+"/") {
			continue
		}
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd.Name()))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				flags, _ := strconv.ParseUint(strings.TrimSpace(v), 8, 64)
				if flags&3 != 0 { // O_WRONLY or O_RDWR
					note(target, "has open for writing")
				}
			}
		}
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 {
			continue
		}
		perms, path := fields[1], strings.Join(fields[5:], " ")
		if len(perms) == 4 && perms[1] == 'w' && perms[3] == 's' && strings.HasPrefix(path, root+"/") {
			note(path, "maps shared-writable")
		}
	}
	return out
}

func nlink(st os.FileInfo) uint64 {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return uint64(s.Nlink)
	}
	return 1
}

// unpinnedMappings lists the files a VMM maps from the data dir whose inode
// no name under its own guest dir links any more, while another name still
// does. The link count is how forkd decides whether a mem-file may be
// written in place (invariant 3 of docs/architecture.md §3); a mapping the count does not show lets a
// sibling write the pages under a running VM.
func unpinnedMappings(pid int, root, guestDir string) []string {
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return nil
	}
	defer f.Close()
	mapped := map[uint64]string{} // inode → path as maps shows it
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 {
			continue
		}
		path := strings.TrimSuffix(strings.Join(fields[5:], " "), " (deleted)")
		if !strings.HasPrefix(path, root+"/") {
			continue
		}
		if ino, err := strconv.ParseUint(fields[4], 10, 64); err == nil && ino != 0 {
			mapped[ino] = path
		}
	}
	if len(mapped) == 0 {
		return nil
	}
	own := map[uint64]bool{}
	linked := map[uint64]bool{}
	filepath.WalkDir(root, func(p string, de os.DirEntry, err error) error {
		if err != nil || !de.Type().IsRegular() {
			return nil
		}
		info, err := de.Info()
		if err != nil {
			return nil
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			linked[st.Ino] = true
			if strings.HasPrefix(p, guestDir+"/") {
				own[st.Ino] = true
			}
		}
		return nil
	})
	var out []string
	for ino, path := range mapped {
		if linked[ino] && !own[ino] {
			out = append(out, fmt.Sprintf("pid %d maps inode %d (%s), linked by others but not under its own %s", pid, ino, path, guestDir))
		}
	}
	return out
}
