package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/mounts"
)

// MemUsage is a process's memory from /proc/PID/smaps_rollup, in bytes.
// Pss divides each shared page among the processes mapping it, so the Pss
// of N forks sums to what they cost together: the density figure.
type MemUsage struct {
	Rss          int64 `json:"rss_bytes"`
	Pss          int64 `json:"pss_bytes"`
	PssAnon      int64 `json:"pss_anon_bytes"`
	PssFile      int64 `json:"pss_file_bytes"`
	SharedClean  int64 `json:"shared_clean_bytes"`
	PrivateClean int64 `json:"private_clean_bytes"`
	PrivateDirty int64 `json:"private_dirty_bytes"`
	Anonymous    int64 `json:"anonymous_bytes"`
}

// Add returns the field-wise sum.
func (m MemUsage) Add(o MemUsage) MemUsage {
	return MemUsage{
		Rss: m.Rss + o.Rss, Pss: m.Pss + o.Pss, PssAnon: m.PssAnon + o.PssAnon, PssFile: m.PssFile + o.PssFile,
		SharedClean: m.SharedClean + o.SharedClean, PrivateClean: m.PrivateClean + o.PrivateClean,
		PrivateDirty: m.PrivateDirty + o.PrivateDirty, Anonymous: m.Anonymous + o.Anonymous,
	}
}

// ReadMemUsage reads /proc/PID/smaps_rollup.
func ReadMemUsage(pid int) (MemUsage, error) {
	f, err := os.Open(filepath.Join("/proc", strconv.Itoa(pid), "smaps_rollup"))
	if err != nil {
		return MemUsage{}, fmt.Errorf("read memory of pid %d: %w", pid, err)
	}
	defer f.Close()
	m, err := ParseSmapsRollup(f)
	if err != nil {
		return MemUsage{}, fmt.Errorf("read memory of pid %d: %w", pid, err)
	}
	return m, nil
}

// ParseSmapsRollup parses smaps_rollup ("Rss:   1744 kB" lines after a
// header line). Rss and Pss must be present; other fields default to 0.
func ParseSmapsRollup(r io.Reader) (MemUsage, error) {
	var m MemUsage
	fields := map[string]*int64{
		"Rss": &m.Rss, "Pss": &m.Pss, "Pss_Anon": &m.PssAnon, "Pss_File": &m.PssFile,
		"Shared_Clean": &m.SharedClean, "Private_Clean": &m.PrivateClean,
		"Private_Dirty": &m.PrivateDirty, "Anonymous": &m.Anonymous,
	}
	seen := map[string]bool{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		key, rest, ok := strings.Cut(sc.Text(), ":")
		dst, known := fields[key]
		if !ok || !known {
			continue
		}
		parts := strings.Fields(rest)
		if len(parts) != 2 || parts[1] != "kB" {
			return MemUsage{}, fmt.Errorf("parse smaps_rollup %s: %q", key, rest)
		}
		kb, err := strconv.ParseInt(parts[0], 10, 64)
		if err != nil {
			return MemUsage{}, fmt.Errorf("parse smaps_rollup %s: %w", key, err)
		}
		*dst = kb << 10
		seen[key] = true
	}
	if err := sc.Err(); err != nil {
		return MemUsage{}, fmt.Errorf("parse smaps_rollup: %w", err)
	}
	if !seen["Rss"] || !seen["Pss"] {
		return MemUsage{}, fmt.Errorf("parse smaps_rollup: no Rss/Pss lines")
	}
	return m, nil
}

// ProcIO is /proc/PID/io: ReadBytes are the bytes this process caused to be
// read from storage (page-cache hits do not count), RChar all bytes read.
type ProcIO struct {
	RChar     int64 `json:"rchar"`
	ReadBytes int64 `json:"read_bytes"`
}

// ReadProcIO reads /proc/PID/io.
func ReadProcIO(pid int) (ProcIO, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "io"))
	if err != nil {
		return ProcIO{}, fmt.Errorf("read io of pid %d: %w", pid, err)
	}
	return ParseProcIO(b)
}

// ParseProcIO parses the "key: value" lines of /proc/PID/io.
func ParseProcIO(b []byte) (ProcIO, error) {
	var p ProcIO
	var seen int
	for _, line := range bytes.Split(b, []byte("\n")) {
		key, val, ok := strings.Cut(string(line), ":")
		if !ok {
			continue
		}
		var dst *int64
		switch key {
		case "rchar":
			dst = &p.RChar
		case "read_bytes":
			dst = &p.ReadBytes
		default:
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSpace(val), 10, 64)
		if err != nil {
			return ProcIO{}, fmt.Errorf("parse /proc io %s: %w", key, err)
		}
		*dst = n
		seen++
	}
	if seen != 2 {
		return ProcIO{}, fmt.Errorf("parse /proc io: missing rchar or read_bytes")
	}
	return p, nil
}

// Disk is the block device under a directory, for reads and space.
type Disk struct {
	Dir    string // the measured directory
	Device string // e.g. /dev/vda, /dev/loop3; "" when not a block device
	FSType string // e.g. ext4, xfs, btrfs
	stat   string // /sys/dev/block/M:m/stat; "" when unknown
}

// DiskOf finds the block device of the filesystem holding dir, through
// /proc/self/mountinfo (btrfs reports an anonymous st_dev, so the mount's
// source is more reliable than stat).
func DiskOf(dir string) (Disk, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return Disk{}, err
	}
	if real, err := filepath.EvalSymlinks(abs); err == nil {
		abs = real // mountinfo knows real paths
	}
	table, err := mounts.Read(mounts.Self)
	if err != nil {
		return Disk{}, fmt.Errorf("disk of %s: %w", dir, err)
	}
	m, _ := table.Holding(abs)
	d := Disk{Dir: abs, Device: m.Source, FSType: m.FSType}
	var st unix.Stat_t
	if d.Device != "" && unix.Stat(d.Device, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK {
		d.stat = fmt.Sprintf("/sys/dev/block/%d:%d/stat", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		if _, err := os.Stat(d.stat); err != nil {
			d.stat = ""
		}
	}
	return d, nil
}

// ReadBytes is the bytes read from the device since boot, or -1 when the
// device is unknown.
func (d Disk) ReadBytes() int64 {
	if d.stat == "" {
		return -1
	}
	b, err := os.ReadFile(d.stat)
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return -1
	}
	sectors, err := strconv.ParseInt(f[2], 10, 64) // field 3: sectors read (512 B)
	if err != nil {
		return -1
	}
	return sectors * 512
}

// UsedBytes is the filesystem's allocated space (statfs). A delta across a
// burst counts what the forks allocated, shared reflink extents only once.
func (d Disk) UsedBytes() int64 {
	var s unix.Statfs_t
	if err := unix.Statfs(d.Dir, &s); err != nil {
		return -1
	}
	return int64(s.Blocks-s.Bfree) * int64(s.Bsize)
}

// DropPageCache writes 3 to /proc/sys/vm/drop_caches (root only) after a
// sync, so the next reads come from disk.
func DropPageCache() error {
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		return fmt.Errorf("drop page cache: %w", err)
	}
	return nil
}

// SchedTimes are a process's scheduler counters summed over its threads
// (/proc/PID/task/*/schedstat): time on a CPU and time runnable but waiting
// for one. On a loaded host the second tells a slow answer that waited for
// a CPU from one that worked longer.
type SchedTimes struct {
	CPU, RunQueueWait time.Duration
}

// ReadSchedTimes reads pid's scheduler counters (zero where the kernel has
// no schedstat).
func ReadSchedTimes(pid int) (SchedTimes, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return SchedTimes{}, err
	}
	var st SchedTimes
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "schedstat"))
		if err != nil {
			continue // a thread that exited meanwhile
		}
		var cpu, wait int64
		if _, err := fmt.Sscan(string(b), &cpu, &wait); err != nil {
			return SchedTimes{}, fmt.Errorf("%s/%s/schedstat: %w", dir, e.Name(), err)
		}
		st.CPU += time.Duration(cpu)
		st.RunQueueWait += time.Duration(wait)
	}
	return st, nil
}
