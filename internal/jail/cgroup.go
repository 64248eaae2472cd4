package jail

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/mounts"
)

// MountTable is the mount table cgroup hierarchies are found in: this
// process's. (Firecracker's jailer reads /proc/mounts, which lists the
// same mounts.)
const MountTable = mounts.Self

// Controllers a jailed VMM is limited by.
var Controllers = []string{"cpu", "memory", "pids"}

// HostCgroups is the hierarchy version (1 or 2) that holds every one of
// Controllers on this host, as a jailer will choose it, or an error saying
// what is missing.
func HostCgroups() (int, error) {
	m, err := ReadMounts(MountTable)
	if err != nil {
		return 0, err
	}
	return m.Version(Controllers...)
}

// cpuPeriodUS is the CFS period of a VMM's cpu quota: vcpus × period of
// CPU time per period.
const cpuPeriodUS = 100000

// Mounts says where the cgroup hierarchies are mounted.
type Mounts struct {
	Unified string            // the cgroup2 mount; "" if none
	V1      map[string]string // v1 controller → its mount point
}

// ReadMounts reads the cgroup and cgroup2 mounts of a mount table (in
// mountinfo's format, see package mounts). The first cgroup2 mount is the
// unified hierarchy, and a v1 controller's hierarchy the first mount that
// names it.
func ReadMounts(path string) (Mounts, error) {
	table, err := mounts.Read(path)
	if err != nil {
		return Mounts{}, fmt.Errorf("cgroup mounts: %w", err)
	}
	m := Mounts{V1: map[string]string{}}
	for _, mt := range table {
		switch mt.FSType {
		case "cgroup2":
			if m.Unified == "" {
				m.Unified = mt.Point
			}
		case "cgroup":
			for _, opt := range mt.SuperOptions {
				if _, taken := m.V1[opt]; !taken {
					m.V1[opt] = mt.Point
				}
			}
		}
	}
	return m, nil
}

// Version is the cgroup version that offers every controller: 2 when the
// unified hierarchy has them all enabled at its root, else 1 when v1
// hierarchies have them all (a hybrid host, where cgroup2 holds only what
// v1 does not), else an error naming what is missing.
func (m Mounts) Version(controllers ...string) (int, error) {
	if have := m.unifiedControllers(); have != nil && all(controllers, func(c string) bool { return slices.Contains(have, c) }) {
		return 2, nil
	}
	var missing []string
	for _, c := range controllers {
		if m.V1[c] == "" {
			missing = append(missing, c)
		}
	}
	if len(missing) == 0 {
		return 1, nil
	}
	return 0, fmt.Errorf("cgroups: no hierarchy offers %s (cgroup2 at %q lacks them, no v1 mount has them)",
		strings.Join(missing, ", "), m.Unified)
}

// Where is the hierarchy that offers controller c: the unified one (2,
// its mount) when c is enabled at its root, else c's v1 mount (1), else
// (0, ""). It reports what the host has, controller by controller; a jail
// takes the one version Version chooses for all of its controllers.
func (m Mounts) Where(c string) (version int, dir string) {
	if slices.Contains(m.unifiedControllers(), c) {
		return 2, m.Unified
	}
	if d := m.V1[c]; d != "" {
		return 1, d
	}
	return 0, ""
}

// unifiedControllers are the controllers enabled at the root of the
// unified hierarchy: none without one, or when its list cannot be read.
func (m Mounts) unifiedControllers() []string {
	if m.Unified == "" {
		return nil
	}
	b, err := os.ReadFile(filepath.Join(m.Unified, "cgroup.controllers"))
	if err != nil {
		return nil
	}
	return strings.Fields(string(b))
}

func all(xs []string, f func(string) bool) bool {
	for _, x := range xs {
		if !f(x) {
			return false
		}
	}
	return true
}

// Limits are what a VMM's cgroup holds it to.
type Limits struct {
	VCPUs       int   // cpu quota: VCPUs full CPUs
	MemoryBytes int64 // memory limit (guest RAM + the VMM's overhead)
	Pids        int   // tasks (threads) the VMM may have
}

// Settings are the --cgroup FILE=VALUE arguments for l under version.
func Settings(version int, l Limits) []string {
	quota := strconv.Itoa(max(l.VCPUs, 1) * cpuPeriodUS)
	mem := strconv.FormatInt(l.MemoryBytes, 10)
	pids := strconv.Itoa(l.Pids)
	if version == 2 {
		return []string{
			"cpu.max=" + quota + " " + strconv.Itoa(cpuPeriodUS),
			"memory.max=" + mem,
			"pids.max=" + pids,
		}
	}
	return []string{
		"cpu.cfs_period_us=" + strconv.Itoa(cpuPeriodUS),
		"cpu.cfs_quota_us=" + quota,
		"memory.limit_in_bytes=" + mem,
		"pids.max=" + pids,
	}
}

// Cgroup is one VMM's cgroup: a directory per v1 hierarchy, or one in the
// unified hierarchy.
type Cgroup struct {
	Version int
	// Dirs maps a controller to its cgroup directory (under v2 every
	// controller maps to the same one).
	Dirs map[string]string
}

// Locate names the cgroup <mount>/<parent>/<id> of each controller, as a
// jailer creates it. It touches nothing.
func (m Mounts) Locate(version int, parent, id string, controllers []string) (Cgroup, error) {
	c := Cgroup{Version: version, Dirs: map[string]string{}}
	for _, ctrl := range controllers {
		var root string
		if version == 2 {
			root = m.Unified
		} else {
			root = m.V1[ctrl]
		}
		if root == "" {
			return c, fmt.Errorf("cgroup v%d: controller %q is not mounted", version, ctrl)
		}
		c.Dirs[ctrl] = filepath.Join(root, parent, id)
	}
	return c, nil
}

// dirs are the distinct directories of c, sorted.
func (c Cgroup) dirs() []string {
	var out []string
	for _, d := range c.Dirs {
		if !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	slices.Sort(out)
	return out
}

// OOMKills is how many processes the memory controller of c killed for
// hitting its limit (oom_kill of memory.oom_control under v1, of
// memory.events under v2). A cgroup that no longer exists reports an error.
func (c Cgroup) OOMKills() (uint64, error) {
	dir := c.Dirs["memory"]
	if dir == "" {
		return 0, errors.New("cgroup has no memory controller")
	}
	file := "memory.oom_control"
	if c.Version == 2 {
		file = "memory.events"
	}
	b, err := os.ReadFile(filepath.Join(dir, file))
	if err != nil {
		return 0, fmt.Errorf("read oom counter: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, " "); ok && k == "oom_kill" {
			return strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("%s has no oom_kill counter (kernel older than 4.13?)", file)
}

// MemoryLimit reads the memory limit c holds (memory.limit_in_bytes under
// v1, memory.max under v2; -1 for none).
func (c Cgroup) MemoryLimit() (int64, error) {
	file := "memory.limit_in_bytes"
	if c.Version == 2 {
		file = "memory.max"
	}
	b, err := os.ReadFile(filepath.Join(c.Dirs["memory"], file))
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	if s == "max" {
		return -1, nil
	}
	return strconv.ParseInt(s, 10, 64)
}

// ProcessMemoryLimit reads the memory limit of the cgroup process pid is in
// (memory.max under v2, memory.limit_in_bytes under v1; -1 for none), for
// checks that a VMM runs under the limit its jail was given.
func ProcessMemoryLimit(pid int) (int64, error) {
	m, err := ReadMounts(MountTable)
	if err != nil {
		return 0, err
	}
	v, err := m.Version(Controllers...)
	if err != nil {
		return 0, err
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) != 3 {
			continue
		}
		var dir string
		switch {
		case v == 2 && f[0] == "0":
			dir = filepath.Join(m.Unified, f[2])
		case v == 1 && strings.Contains(","+f[1]+",", ",memory,"):
			dir = filepath.Join(m.V1["memory"], f[2])
		default:
			continue
		}
		return Cgroup{Version: v, Dirs: map[string]string{"memory": dir}}.MemoryLimit()
	}
	return 0, fmt.Errorf("pid %d has no memory cgroup", pid)
}

// Remove deletes c's directories once no process is left in them. A
// directory already gone is not an error. (A cgroup directory is removed
// with rmdir even though it lists files: they are the kernel's.)
func (c Cgroup) Remove() error {
	var errs []error
	for _, d := range c.dirs() {
		if err := os.Remove(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// RemoveParent removes the cgroup <mount>/<parent> of each controller
// once nothing is below it: the daemon at exit, when its last VMM is gone.
// One that still holds a VMM's cgroup (a VMM outlives its daemon by
// design) is left, and that is not an error.
func (m Mounts) RemoveParent(version int, parent string, controllers []string) error {
	cg, err := m.Locate(version, parent, "", controllers)
	if err != nil {
		return err
	}
	var errs []error
	for _, d := range cg.dirs() {
		if err := os.Remove(d); err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, unix.EBUSY) {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// DataDirParent is the cgroup below which the VMMs of the data dir whose
// tag (network.Tag) is tag get theirs, in every controller: forkd-<tag>.
// One per data dir, so two daemons' VMMs never meet in one.
func DataDirParent(tag string) string { return "forkd-" + tag }

// RemoveHostTree removes every VMM cgroup below parent, and parent, in the
// host hierarchy that holds Controllers (where a jailer made them),
// waiting (until ctx ends) for VMMs just killed to leave theirs: for
// whoever tears a data dir down for good. A cgroup that still holds a
// process when ctx ends is an error naming it. A host whose hierarchies
// lack a controller has no jail cgroups: nothing to remove.
func RemoveHostTree(ctx context.Context, parent string) error {
	mounts, err := ReadMounts(MountTable)
	if err != nil {
		return err
	}
	version, err := mounts.Version(Controllers...)
	if err != nil {
		return nil
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		err := mounts.RemoveTree(version, parent, Controllers)
		if !errors.Is(err, unix.EBUSY) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-tick.C:
		}
	}
}

// RemoveTree removes every VMM cgroup below <mount>/<parent> of each
// controller, then the parent: what a data dir's VMMs leave once all of
// them are gone (a test's cleanup; a daemon killed before its VMMs were
// released). A cgroup that still holds a process cannot be removed: its
// error names it (errors.Is EBUSY), and the rest are still removed.
func (m Mounts) RemoveTree(version int, parent string, controllers []string) error {
	cg, err := m.Locate(version, parent, "", controllers)
	if err != nil {
		return err
	}
	var errs []error
	for _, d := range cg.dirs() {
		ents, err := os.ReadDir(d)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("list cgroup %s: %w", d, err))
			continue
		}
		for _, e := range ents {
			if e.IsDir() {
				if err := os.Remove(filepath.Join(d, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
					errs = append(errs, fmt.Errorf("remove cgroup %s: %w", filepath.Join(d, e.Name()), err))
				}
			}
		}
		if err := os.Remove(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// setupCgroups is the jailer's cgroup step: create <mount>/<parent>/<id>
// for each controller a setting names, write the settings (a value the new
// cgroup starts empty with, like cpuset's, first inherits its parent's),
// then move this process into every one of them.
func setupCgroups(m Mounts, a Args) error {
	version := a.CgroupVersion
	if version == 0 {
		version = 1
	}
	parent := a.parentCgroup()
	if len(a.Cgroups) == 0 {
		if version == 2 {
			// The jailer's documented v2 behaviour: with no settings, join
			// the parent cgroup if it exists, else stay where we are.
			procs := filepath.Join(m.Unified, parent, "cgroup.procs")
			if _, err := os.Stat(procs); err != nil {
				return nil
			}
			return writeFile(procs, strconv.Itoa(os.Getpid()))
		}
		return nil
	}
	type setting struct{ ctrl, file, value string }
	var order []string // controllers in first-seen order
	byCtrl := map[string][]setting{}
	for _, s := range a.Cgroups {
		file, value, err := parseCgroupSetting(s)
		if err != nil {
			return err
		}
		ctrl, _, _ := strings.Cut(file, ".")
		if _, ok := byCtrl[ctrl]; !ok {
			order = append(order, ctrl)
		}
		byCtrl[ctrl] = append(byCtrl[ctrl], setting{ctrl, file, value})
	}
	if version == 2 {
		if m.Unified == "" {
			return errors.New("cgroup v2: no cgroup2 hierarchy is mounted")
		}
		have := m.unifiedControllers()
		for _, ctrl := range order {
			if !slices.Contains(have, ctrl) {
				return fmt.Errorf("cgroup v2: controller %q is not available in %s", ctrl, m.Unified)
			}
		}
	}
	cg, err := m.Locate(version, parent, a.ID, order)
	if err != nil {
		return err
	}
	for _, ctrl := range order {
		dir := cg.Dirs[ctrl]
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("create cgroup %s: %w", dir, err)
		}
		if version == 2 {
			if err := enableSubtree(m.Unified, filepath.Dir(dir), ctrl); err != nil {
				return err
			}
		}
		for _, s := range byCtrl[ctrl] {
			if version == 1 {
				if err := inheritIfEmpty(dir, s.file, strings.Count(parent, "/")+1); err != nil {
					return err
				}
			}
			if err := writeFile(filepath.Join(dir, s.file), s.value); err != nil {
				return fmt.Errorf("cgroup %s: %w", s.file, err)
			}
		}
	}
	for _, dir := range cg.dirs() {
		// cgroup.procs moves every thread of the process (v1 `tasks`, which
		// the real jailer writes, moves only one).
		if err := writeFile(filepath.Join(dir, "cgroup.procs"), strconv.Itoa(os.Getpid())); err != nil {
			return fmt.Errorf("join cgroup %s: %w", dir, err)
		}
	}
	return nil
}

// enableSubtree turns ctrl on in cgroup.subtree_control of every cgroup
// from the unified root down to dir, so dir's children may use it.
func enableSubtree(root, dir, ctrl string) error {
	rel, err := filepath.Rel(root, dir)
	if err != nil || strings.HasPrefix(rel, "..") {
		return fmt.Errorf("cgroup %s is not under %s", dir, root)
	}
	cur := root
	parts := []string{""}
	if rel != "." {
		parts = append(parts, strings.Split(rel, "/")...)
	}
	for _, p := range parts {
		cur = filepath.Join(cur, p)
		if err := writeFile(filepath.Join(cur, "cgroup.subtree_control"), "+"+ctrl); err != nil {
			return fmt.Errorf("enable %s in %s: %w", ctrl, cur, err)
		}
	}
	return nil
}

// inheritIfEmpty gives dir/file its parent's value when it starts empty
// (cpuset.cpus and cpuset.mems do, and then refuse tasks), looking up to
// depth levels up, as the jailer does.
func inheritIfEmpty(dir, file string, depth int) error {
	b, err := os.ReadFile(filepath.Join(dir, file))
	if err != nil || len(bytes.TrimSpace(b)) > 0 {
		return nil // missing (it will be reported on write) or set
	}
	parent := filepath.Dir(dir)
	pb, err := os.ReadFile(filepath.Join(parent, file))
	if err == nil && len(bytes.TrimSpace(pb)) == 0 && depth > 0 {
		if err := inheritIfEmpty(parent, file, depth-1); err != nil {
			return err
		}
		pb, err = os.ReadFile(filepath.Join(parent, file))
	}
	if err != nil || len(bytes.TrimSpace(pb)) == 0 {
		return fmt.Errorf("cgroup %s: %s is empty and its parent has no value to inherit", dir, file)
	}
	return writeFile(filepath.Join(dir, file), string(bytes.TrimSpace(pb)))
}

// writeFile writes one value to a cgroup (or proc) file, which must exist.
func writeFile(path, value string) error {
	// O_APPEND changes nothing for a cgroup file (each write is one
	// command, as with a shell's >>) and lets a test's plain-file tree
	// keep every write.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(value + "\n"); err != nil {
		f.Close()
		return fmt.Errorf("write %q to %s: %w", value, path, err)
	}
	return f.Close()
}
