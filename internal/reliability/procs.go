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
	"github.com/forkd/forkd/internal/jail"
	"golang.org/x/sys/unix"
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

// sharedWrites lists the files on the data dir's filesystem with more than
// one link that pid could write: open read-write or write-only, or mapped
// MAP_SHARED with write permission. forkd promises there are none (invariant
// 3 of docs/architecture.md §3: nobody writes a shared inode); MAP_PRIVATE mappings of a shared mem-file (the
// File restore backend) are fine, their writes never reach the file. Files
// are matched by device and inode, not by path: a jailed VMM's paths are
// its jail's.
func sharedWrites(pid int, root string) []string {
	var out []string
	var rst syscall.Stat_t
	if err := syscall.Stat(root, &rst); err != nil {
		return nil
	}
	fdDir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, _ := os.ReadDir(fdDir)
	for _, fd := range fds {
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join(fdDir, fd.Name()), &st) != nil || st.Dev != rst.Dev ||
			st.Mode&syscall.S_IFMT != syscall.S_IFREG || st.Nlink <= 1 {
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
					target, _ := os.Readlink(filepath.Join(fdDir, fd.Name()))
					out = append(out, fmt.Sprintf("pid %d has open for writing %s (inode %d, nlink %d)", pid, target, st.Ino, st.Nlink))
				}
			}
		}
	}
	for _, mp := range dataDirMappings(pid, rst.Dev) {
		if mp.perms[1] != 'w' || mp.perms[3] != 's' {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(fmt.Sprintf("/proc/%d/map_files/%s", pid, mp.addr), &st) == nil && st.Nlink > 1 {
			out = append(out, fmt.Sprintf("pid %d maps shared-writable %s (inode %d, nlink %d)", pid, mp.path, mp.ino, st.Nlink))
		}
	}
	return out
}

// mapping is one line of /proc/PID/maps.
type mapping struct {
	addr, perms, path string
	ino               uint64
}

// dataDirMappings lists pid's mappings of files on device dev.
func dataDirMappings(pid int, dev uint64) []mapping {
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []mapping
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || len(fields[1]) != 4 {
			continue
		}
		maj, min, ok := strings.Cut(fields[3], ":")
		ma, err1 := strconv.ParseUint(maj, 16, 32)
		mi, err2 := strconv.ParseUint(min, 16, 32)
		ino, err3 := strconv.ParseUint(fields[4], 10, 64)
		if !ok || err1 != nil || err2 != nil || err3 != nil || ino == 0 || unix.Mkdev(uint32(ma), uint32(mi)) != dev {
			continue
		}
		out = append(out, mapping{addr: fields[0], perms: fields[1], ino: ino,
			path: strings.TrimSuffix(strings.Join(fields[5:], " "), " (deleted)")})
	}
	return out
}

// unpinnedMappings lists the files a VMM maps from the data dir whose inode
// no name under its own guest dir links any more, while another name still
// does. The link count is how forkd decides whether a mem-file may be
// written in place; a mapping the count does not show lets a sibling write
// the pages under a running VM. Mappings are matched by device and inode.
func unpinnedMappings(pid int, root, guestDir string) []string {
	var rst syscall.Stat_t
	if err := syscall.Stat(root, &rst); err != nil {
		return nil
	}
	mapped := map[uint64]string{} // inode → path as maps shows it
	for _, mp := range dataDirMappings(pid, rst.Dev) {
		mapped[mp.ino] = mp.path
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

// jailBreaches lists how VMM pid (of instance guest dir jailRoot) is not
// confined: uid or gid 0, a root directory other than its jail root, the
// daemon's network namespace, no memory limit on its cgroup, no seccomp
// filter.
func jailBreaches(pid, daemonPid int, jailRoot string) []string {
	var bad []string
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil // gone meanwhile
	}
	for _, line := range strings.Split(string(status), "\n") {
		k, v, _ := strings.Cut(line, ":")
		switch k {
		case "Uid", "Gid":
			for _, f := range strings.Fields(v) {
				if f == "0" {
					bad = append(bad, fmt.Sprintf("pid %d: %s %s has a 0", pid, k, strings.TrimSpace(v)))
					break
				}
			}
		case "Seccomp":
			if strings.TrimSpace(v) != "2" {
				bad = append(bad, fmt.Sprintf("pid %d: Seccomp %s, want 2 (a filter)", pid, strings.TrimSpace(v)))
			}
		}
	}
	var r, j, ns, dns syscall.Stat_t
	if syscall.Stat(fmt.Sprintf("/proc/%d/root", pid), &r) != nil || syscall.Stat(jailRoot, &j) != nil || r.Dev != j.Dev || r.Ino != j.Ino {
		bad = append(bad, fmt.Sprintf("pid %d: its root is not its jail %s", pid, jailRoot))
	}
	if syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &ns) == nil && syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", daemonPid), &dns) == nil && ns.Ino == dns.Ino {
		bad = append(bad, fmt.Sprintf("pid %d: in the daemon's network namespace", pid))
	}
	if limit, err := jail.ProcessMemoryLimit(pid); err != nil || limit <= 0 || limit >= 1<<62 {
		bad = append(bad, fmt.Sprintf("pid %d: its cgroup has no memory limit (%d, %v)", pid, limit, err))
	}
	return bad
}
