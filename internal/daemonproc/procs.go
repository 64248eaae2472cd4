package daemonproc

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Process is a live process of a data dir.
type Process struct {
	Pid  int
	Kind string // "vmm", "pager", "daemon" or "other"
	Args []string
	// APISock and ID are a VMM's --api-sock and --id ("" for other kinds).
	// The socket path is as the VMM names it: inside its jail, or relative
	// to its working directory.
	APISock, ID string
}

// ProcessesUnder scans /proc for the live (non-zombie) processes of the data
// dir root: the daemon and its pager, whose command lines name a path
// inside it, and its VMMs (which run in their own sessions and outlive
// it), whose working directory is a guest dir inside it or, jailed, whose
// root directory is one of its jails (a pivoted VMM's paths say nothing of
// the host, so its root is compared by device and inode).
func ProcessesUnder(root string) []Process {
	root = filepath.Clean(root)
	jails := jailRoots(root)
	ents, _ := os.ReadDir("/proc")
	var out []Process
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if !namesPathUnder(args, root) && !livesUnder(pid, root, jails) || IsZombie(pid) {
			continue
		}
		p := Process{Pid: pid, Kind: "other", Args: args}
		switch {
		case filepath.Base(args[0]) == "forkd-vmm" || filepath.Base(args[0]) == "firecracker" || (len(args) > 1 && args[1] == "vmm"):
			p.Kind = "vmm"
			p.APISock, p.ID = flagValue(args, "--api-sock"), flagValue(args, "--id")
		case len(args) > 1 && args[1] == "pager":
			p.Kind = "pager"
		case len(args) > 1 && args[1] == "serve":
			p.Kind = "daemon"
		}
		out = append(out, p)
	}
	return out
}

func namesPathUnder(args []string, root string) bool {
	for _, a := range args {
		if a == root || strings.HasPrefix(a, root+"/") {
			return true
		}
	}
	return false
}

// livesUnder reports whether process pid works in a directory under root
// or has one of root's jails as its root directory.
func livesUnder(pid int, root string, jails map[[2]uint64]bool) bool {
	proc := filepath.Join("/proc", strconv.Itoa(pid))
	if cwd, err := os.Readlink(proc + "/cwd"); err == nil && strings.HasPrefix(cwd, root+"/") {
		return true
	}
	var st syscall.Stat_t
	return len(jails) > 0 && syscall.Stat(proc+"/root", &st) == nil && jails[[2]uint64{st.Dev, st.Ino}]
}

// jailRoots is the device and inode of every jail root of a data dir
// (<root>/jail/<exec>/<id>/root, temp names included), and of those the
// reconciler set aside in lost+found (lost+found/jail/<id>/root) while
// their VMMs ran on.
func jailRoots(root string) map[[2]uint64]bool {
	out := map[[2]uint64]bool{}
	dirs, _ := filepath.Glob(filepath.Join(root, "jail", "*", "*", "root"))
	moved, _ := filepath.Glob(filepath.Join(root, "lost+found", "jail", "*", "root"))
	dirs = append(dirs, moved...)
	for _, d := range dirs {
		var st syscall.Stat_t
		if syscall.Lstat(d, &st) == nil && st.Mode&syscall.S_IFMT == syscall.S_IFDIR {
			out[[2]uint64{st.Dev, st.Ino}] = true
		}
	}
	return out
}

func flagValue(args []string, name string) string {
	for i, a := range args {
		if a == name && i+1 < len(args) {
			return args[i+1]
		}
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	return ""
}

// IsZombie reports whether pid is gone or a zombie.
func IsZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true // gone
	}
	// The state follows the command's closing parenthesis.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] == 'Z' || s[i+2] == 'X'
}
