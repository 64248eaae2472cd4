package daemonproc

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Process is a live process whose command line names a path in a data dir.
type Process struct {
	Pid  int
	Kind string // "vmm", "pager", "daemon" or "other"
	Args []string
	// APISock is a VMM's --api-sock ("" for other kinds).
	APISock string
}

// ProcessesUnder scans /proc for live (non-zombie) processes whose command
// line has an argument inside root: the daemon, its VMMs (which run in their
// own sessions and outlive it) and its pager.
func ProcessesUnder(root string) []Process {
	root = filepath.Clean(root)
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
		inside := false
		for _, a := range args {
			if a == root || strings.HasPrefix(a, root+"/") {
				inside = true
				break
			}
		}
		if !inside || IsZombie(pid) {
			continue
		}
		p := Process{Pid: pid, Kind: "other", Args: args}
		if len(args) > 1 {
			switch args[1] {
			case "vmm":
				p.Kind = "vmm"
				p.APISock = flagValue(args, "--api-sock")
			case "pager":
				p.Kind = "pager"
			case "serve":
				p.Kind = "daemon"
			}
		}
		out = append(out, p)
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
