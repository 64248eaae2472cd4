package mounts

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/testenv"
)

// kernelTable is shaped as the kernel writes /proc/self/mountinfo: zero,
// one or two optional fields before the "-", octal escapes in mount
// points, sources and types, a mount covering an earlier one at the same
// point.
const kernelTable = `22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
25 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
35 31 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,memory
36 31 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
40 22 7:3 / /srv/vm\040data rw,relatime shared:20 master:3 - xfs /dev/loop3 rw,attr2,inode64
41 22 0:50 / /tmp/tab\011and\012newline rw - tmpfs my\040src rw,size=1024k
42 22 0:51 /sub /tmp/back\134slash rw,relatime - fuse.sshfs host:/a\040b rw,user_id=0
43 22 7:4 / /tmp/over rw - ext4 /dev/loop4 rw
44 22 7:5 / /tmp/over rw - btrfs /dev/loop5 rw,space_cache=v2
`

func TestParseUndoesEscapesAndFindsTheTypeAfterTheSeparator(t *testing.T) {
	tab, err := Parse(strings.NewReader(kernelTable))
	if err != nil {
		t.Fatal(err)
	}
	if len(tab) != 10 {
		t.Fatalf("%d mounts, want 10: %+v", len(tab), tab)
	}
	for _, tc := range []struct {
		point          string
		fstype, source string
		options        []string
	}{
		{"/", "ext4", "/dev/vda1", []string{"rw", "errors=remount-ro"}},
		{"/sys/fs/cgroup/memory", "cgroup", "cgroup", []string{"rw", "memory"}},
		{"/sys/fs/cgroup/cpu,cpuacct", "cgroup", "cgroup", []string{"rw", "cpu", "cpuacct"}},
		{"/srv/vm data", "xfs", "/dev/loop3", []string{"rw", "attr2", "inode64"}},   // two optional fields
		{"/tmp/tab\tand\nnewline", "tmpfs", "my src", []string{"rw", "size=1024k"}}, // none
		{`/tmp/back\slash`, "fuse.sshfs", "host:/a b", []string{"rw", "user_id=0"}},
		{"/tmp/over", "btrfs", "/dev/loop5", []string{"rw", "space_cache=v2"}}, // the covering mount
	} {
		m, ok := tab.At(tc.point)
		if !ok {
			t.Errorf("At(%q): no mount; table %+v", tc.point, tab)
			continue
		}
		if m.FSType != tc.fstype || m.Source != tc.source || !slices.Equal(m.SuperOptions, tc.options) {
			t.Errorf("At(%q) = %+v, want type %q source %q options %q", tc.point, m, tc.fstype, tc.source, tc.options)
		}
	}
	for _, raw := range []string{`/srv/vm\040data`, "/srv/vm", "/srv", "/tmp/over/x"} {
		if m, ok := tab.At(raw); ok {
			t.Errorf("At(%q) = %+v; only a mount point as the kernel means it is one", raw, m)
		}
	}
}

func TestHoldingIsTheLongestMountPointAboveThePath(t *testing.T) {
	tab, err := Parse(strings.NewReader(kernelTable))
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{
		"/var/lib/forkd":              "/dev/vda1",
		"/srv/vm data":                "/dev/loop3",
		"/srv/vm data/guests/a":       "/dev/loop3",
		"/srv/vm":                     "/dev/vda1", // a prefix of the name is not the mount
		"/srv/vm datax":               "/dev/vda1",
		"/sys/fs/cgroup/memory/forkd": "cgroup",
		"/sys/fs/cgroupx":             "sysfs",
		"/tmp/over/f":                 "/dev/loop5", // the covering mount, not the covered one
		"/":                           "/dev/vda1",
	} {
		m, ok := tab.Holding(path)
		if !ok || m.Source != want {
			t.Errorf("Holding(%q) = %+v, %v; want the mount of %s", path, m, ok, want)
		}
	}
	if m, ok := (Table{{Point: "/a"}}).Holding("/b"); ok {
		t.Errorf("a table without / holds /b: %+v", m)
	}
}

func TestParseRefusesALineThatIsNoMount(t *testing.T) {
	for name, line := range map[string]string{
		"too few fields": "22 1 254:1 / / rw - ext4\n",
		"no separator":   "22 1 254:1 / / rw shared:1 ext4 /dev/vda1 rw x\n",
		"mounts format":  "/dev/vda1 / ext4 rw,relatime 0 0\n",
	} {
		if tab, err := Parse(strings.NewReader(line)); err == nil {
			t.Errorf("%s: %q parsed as %+v; want an error", name, line, tab)
		}
	}
	if _, err := Read(filepath.Join(t.TempDir(), "none")); err == nil {
		t.Error("Read of a missing file: no error")
	}
}

// awkwardNames are directory names the kernel escapes in its table.
var awkwardNames = []string{"a b", "tab\there", "new\nline", `back\slash`}

// mountTmpfs mounts a small tmpfs at dir until the test ends.
func mountTmpfs(t *testing.T, source, dir string) {
	t.Helper()
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(source, dir, "tmpfs", 0, "size=64k"); err != nil {
		t.Fatalf("mount tmpfs at %q: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %q: %v", dir, err)
		}
	})
}

// Real mounts at paths with awkward names are found, with their source,
// through this process's own table.
func TestReadFindsARealMountAtAPathWithASpace(t *testing.T) {
	testenv.NeedRoot(t)
	parent := t.TempDir()
	for _, name := range awkwardNames {
		mountTmpfs(t, "forkd test "+name, filepath.Join(parent, name))
	}
	tab, err := Read(Self)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range awkwardNames {
		dir := filepath.Join(parent, name)
		m, ok := tab.At(dir)
		if !ok || m.FSType != "tmpfs" || m.Source != "forkd test "+name {
			t.Errorf("At(%q) = %+v, %v; want the tmpfs mounted there from %q", dir, m, ok, "forkd test "+name)
		}
		if h, ok := tab.Holding(filepath.Join(dir, "f")); !ok || h.Point != dir {
			t.Errorf("Holding(%q) = %+v, %v; want the mount at %q", filepath.Join(dir, "f"), h, ok, dir)
		}
	}
}

// The twin: the kernel's own text holds these mount points escaped, so a
// reader that splits lines and keeps the fields as written (as two of
// forkd's did) misses every one of them. The test above passes only
// because the escapes are undone.
func TestARealMountAtAPathWithASpaceIsMissedWithoutUnescaping(t *testing.T) {
	testenv.NeedRoot(t)
	parent := t.TempDir()
	for _, name := range awkwardNames {
		mountTmpfs(t, "tmpfs", filepath.Join(parent, name))
	}
	raw, err := os.ReadFile(Self)
	if err != nil {
		t.Fatal(err)
	}
	var asWritten []string
	for _, line := range strings.Split(string(raw), "\n") {
		if f := strings.Fields(line); len(f) > 4 {
			asWritten = append(asWritten, f[4])
		}
	}
	escaped := strings.NewReplacer(`\`, `\134`, " ", `\040`, "\t", `\011`, "\n", `\012`)
	for _, name := range awkwardNames {
		dir := filepath.Join(parent, name)
		if slices.Contains(asWritten, dir) {
			t.Errorf("%q is in the kernel's table as written: a reader that does not unescape would find it", dir)
		}
		if !slices.Contains(asWritten, escaped.Replace(dir)) {
			t.Errorf("%q is not in the kernel's table as %q", dir, escaped.Replace(dir))
		}
	}
}

// TestAnOverlongLineIsLeftOutNotFatal: a mount whose line is longer than
// the parser reads (an overlay of hundreds of layers lists them all) is
// left out, and every other mount is still found. Its twin is the parser
// itself on the same table, which fails on that line.
func TestAnOverlongLineIsLeftOutNotFatal(t *testing.T) {
	var layers []string
	for i := range 1000 {
		layers = append(layers, fmt.Sprintf("/var/lib/containers/storage/overlay/l/LAYER%05dABCDEFGHIJKLMNOPQRSTUVWXYZ", i))
	}
	long := "60 22 0:60 / /merged rw,relatime - overlay overlay rw,lowerdir=" + strings.Join(layers, ":") + "\n"
	if len(long) <= maxLine {
		t.Fatalf("the overlay line is %d bytes, not over the parser's %d: the test would show nothing", len(long), maxLine)
	}
	table := kernelTable + long + "61 22 0:61 / /after rw - tmpfs tmpfs rw\n"
	tab, err := Parse(strings.NewReader(table))
	if err != nil {
		t.Fatalf("a table with one overlong line: %v; want it read without that line", err)
	}
	if _, ok := tab.At("/merged"); ok {
		t.Error("the overlong line was kept")
	}
	for _, dir := range []string{"/sys/fs/cgroup/memory", "/srv/vm data", "/after"} {
		if _, ok := tab.At(dir); !ok {
			t.Errorf("%q is missing from the table read with an overlong line in it", dir)
		}
	}
	if _, err := mountinfo.GetMountsFromReader(strings.NewReader(table), nil); err == nil {
		t.Error("twin: the parser read the overlong line itself, so the check shows nothing")
	}
}
