package bench

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/loopfs"
	"github.com/forkd/forkd/internal/testfs"
	"golang.org/x/sys/unix"
)

const rollupFixture = `559952840000-7ffdb4f7c000 ---p 00000000 00:00 0                          [rollup]
Rss:                1744 kB
Pss:                 348 kB
Pss_Dirty:           112 kB
Pss_Anon:            112 kB
Pss_File:            236 kB
Pss_Shmem:             0 kB
Shared_Clean:       1592 kB
Shared_Dirty:          0 kB
Private_Clean:        40 kB
Private_Dirty:       112 kB
Referenced:         1744 kB
Anonymous:           112 kB
`

func TestParseSmapsRollup(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		want    MemUsage
		wantErr bool
	}{
		{"kernel 6.x rollup", rollupFixture, MemUsage{Rss: 1744 << 10, Pss: 348 << 10, PssAnon: 112 << 10, PssFile: 236 << 10,
			SharedClean: 1592 << 10, PrivateClean: 40 << 10, PrivateDirty: 112 << 10, Anonymous: 112 << 10}, false},
		{"no Pss line is an error, not zero", "Rss: 10 kB\n", MemUsage{}, true},
		{"unit other than kB", "Rss: 10 MB\nPss: 1 kB\n", MemUsage{}, true},
		{"garbage number", "Rss: ten kB\nPss: 1 kB\n", MemUsage{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseSmapsRollup(strings.NewReader(tc.in))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tc.wantErr)
			}
			if got != tc.want {
				t.Errorf("got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestReadMemUsageSeesTouchedAnonymousMemory(t *testing.T) {
	const size = 16 << 20
	before, err := ReadMemUsage(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(b)
	for i := 0; i < size; i += 4096 {
		b[i] = 1
	}
	after, err := ReadMemUsage(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if grew := after.Anonymous - before.Anonymous; grew < size*9/10 {
		t.Errorf("Anonymous grew by %d bytes after touching %d", grew, size)
	}
	if after.Pss < after.PssAnon || after.Rss < after.Pss {
		t.Errorf("inconsistent usage %+v: want Rss >= Pss >= Pss_Anon", after)
	}
}

func TestParseProcIO(t *testing.T) {
	got, err := ParseProcIO([]byte("rchar: 6976\nwchar: 0\nsyscr: 10\nsyscw: 0\nread_bytes: 4096\nwrite_bytes: 0\ncancelled_write_bytes: 0\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got != (ProcIO{RChar: 6976, ReadBytes: 4096}) {
		t.Errorf("got %+v", got)
	}
	if _, err := ParseProcIO([]byte("rchar: 1\n")); err == nil {
		t.Error("missing read_bytes parsed without error")
	}
	if _, err := ReadProcIO(os.Getpid()); err != nil {
		t.Errorf("ReadProcIO(self): %v", err)
	}
}

// A data dir under a path with a space (written \040 in the kernel's
// mount table) is measured on its own loop device, not on the filesystem
// its mount point sits in.
func TestDiskOfFindsTheDeviceUnderAPathWithASpace(t *testing.T) {
	testfs.Need(t, testfs.Ext4)
	parent := filepath.Join(t.TempDir(), "a b")
	if err := os.Mkdir(parent, 0o700); err != nil {
		t.Fatal(err)
	}
	fs, err := loopfs.MountIn(parent, testfs.Ext4, 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := fs.Close(); err != nil {
			t.Error(err)
		}
	})
	data := filepath.Join(fs.Dir, "data dir")
	if err := os.Mkdir(data, 0o700); err != nil {
		t.Fatal(err)
	}
	d, err := DiskOf(data)
	if err != nil {
		t.Fatal(err)
	}
	if d.Device != fs.Device || d.FSType != "ext4" {
		t.Errorf("DiskOf(%q) = %s %s, want %s ext4", data, d.Device, d.FSType, fs.Device)
	}
	if d, err := DiskOf(parent); err != nil || d.Device == fs.Device {
		t.Errorf("DiskOf(%q) = %+v, %v; want the filesystem %s is mounted in, not %s", parent, d, err, fs.Dir, fs.Device)
	}
}

func TestDiskOfRootCountsReads(t *testing.T) {
	// A loopback ext4: a block device on any machine (a temp dir may be
	// on tmpfs or overlayfs, which have no read counters).
	d, err := DiskOf(testfs.Mount(t, testfs.Ext4, 64<<20).Dir)
	if err != nil {
		t.Fatal(err)
	}
	if d.UsedBytes() <= 0 {
		t.Errorf("UsedBytes of %s = %d", d.Dir, d.UsedBytes())
	}
	if d.Device == "" || !strings.HasPrefix(d.Device, "/dev/") {
		t.Fatalf("a loopback ext4 is on %q, not a block device", d.Device)
	}
	if d.ReadBytes() < 0 {
		t.Errorf("ReadBytes of %s (%s) unknown", d.Dir, d.Device)
	}
}

func TestReadSchedTimesCountsThisProcessesCPU(t *testing.T) {
	before, err := ReadSchedTimes(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	spin(t, time.Nanosecond) // fails unless the CPU time read grows
	after, err := ReadSchedTimes(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if after.CPU <= before.CPU {
		t.Fatalf("busy work and the CPU time read %v, as before", after.CPU)
	}
	if after.RunQueueWait < before.RunQueueWait {
		t.Fatalf("run-queue wait went down from %v to %v", before.RunQueueWait, after.RunQueueWait)
	}
	if _, err := ReadSchedTimes(1 << 30); err == nil {
		t.Fatal("ReadSchedTimes of a pid that cannot exist: no error")
	}
}
