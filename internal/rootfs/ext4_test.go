package rootfs

import (
	"archive/tar"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/rootfs/rootfstest"
	"github.com/forkd/forkd/internal/testenv"
	"github.com/forkd/forkd/internal/testfs"
)

func needLoop(t *testing.T) {
	t.Helper()
	testenv.NeedRoot(t)
	testfs.Need(t, testfs.Ext4)
}

// TestMakeExt4HoldsTheTreeExactly builds an image from an applied tree,
// mounts it read-only and compares it with the tree: every path, type,
// mode, owner, content, link target, device number, xattr and hardlink.
// The image must be sparse and sized from the content plus headroom.
func TestMakeExt4HoldsTheTreeExactly(t *testing.T) {
	needLoop(t)
	dir, err := apply(t, Options{}, layer(t,
		file{Name: "etc/hosts", Mode: 0o644, Body: "127.0.0.1 localhost\n"},
		file{Name: "usr/bin/su", Mode: 0o4755, Body: "su"},
		file{Name: "usr/bin/su2", Type: tar.TypeLink, Link: "usr/bin/su"},
		file{Name: "home/u/.profile", Mode: 0o640, UID: 1000, GID: 100, Body: "export A=1\n"},
		file{Name: "lib", Type: tar.TypeSymlink, Link: "usr/lib"},
		file{Name: "long", Type: tar.TypeSymlink, Link: strings.Repeat("x/", 60) + "end"},
		file{Name: "dev/sda", Type: tar.TypeBlock, Mode: 0o660, GID: 6, Major: 8, Minor: 0},
		file{Name: "run/pipe", Type: tar.TypeFifo, Mode: 0o644},
		file{Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
		file{Name: "x", Mode: 0o755, Body: "x", Xattrs: map[string]string{"security.capability": "\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", "user.note": "n"}},
		file{Name: "big", Mode: 0o644, Body: "start", Zeros: 256 << 20},
	))
	if err != nil {
		t.Fatal(err)
	}
	u, err := Measure(dir)
	if err != nil {
		t.Fatal(err)
	}
	size, inodes := ImageSize(u, 32<<20)
	img := filepath.Join(t.TempDir(), "rootfs.ext4")
	if err := MakeExt4(context.Background(), dir, img, size, inodes); err != nil {
		t.Fatal(err)
	}
	want, err := rootfstest.Walk(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := rootfstest.Walk(rootfstest.MountExt4(t, img))
	if err != nil {
		t.Fatal(err)
	}
	delete(want, ".") // the unpack dir is private (0700); mkfs gives the image's root 0755
	if d := rootfstest.Diff(want, got, "lost+found"); len(d) > 0 {
		t.Errorf("the ext4 image differs from the tree it was made from:\n%s", strings.Join(d, "\n"))
	}
	if st, _ := os.Stat(img); st.Size() != size || size > 256<<20+64<<20+32<<20 {
		t.Errorf("image is %d bytes, want %d (content 256 MiB + 32 MiB headroom + metadata)", st.Size(), size)
	}
	if a := rootfstest.Allocated(t, img); a > 64<<20 {
		t.Errorf("image allocates %d bytes for ~1 MiB of data: the 256 MiB of zeros or the inode tables were written out", a)
	}
	free := freeBytes(t, img)
	if free < 24<<20 {
		t.Errorf("image has %d bytes free, want about the 32 MiB headroom", free)
	}
}

// TestGrowEnlargesTheFilesystem: a clone grown to 1 GiB is a 1 GiB
// filesystem with its files intact; growing below the image is ErrTooSmall.
func TestGrowEnlargesTheFilesystem(t *testing.T) {
	needLoop(t)
	dir, err := apply(t, Options{}, layer(t, file{Name: "f", Mode: 0o644, Body: "kept"}))
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "rootfs.ext4")
	size, inodes := ImageSize(Usage{DataBytes: 1 << 20, Inodes: 10}, 0)
	if err := MakeExt4(context.Background(), dir, img, size, inodes); err != nil {
		t.Fatal(err)
	}
	if err := Grow(context.Background(), img, size-4096); !errors.Is(err, ErrTooSmall) {
		t.Errorf("Grow below the image: %v, want ErrTooSmall", err)
	}
	if err := Grow(context.Background(), img, 1<<30); err != nil {
		t.Fatal(err)
	}
	if free := freeBytes(t, img); free < 900<<20 {
		t.Errorf("grown filesystem has %d bytes free, want about 1 GiB", free)
	}
	if b, err := os.ReadFile(filepath.Join(rootfstest.MountExt4(t, img), "f")); err != nil || string(b) != "kept" {
		t.Errorf("after Grow, f reads %q, %v", b, err)
	}
	if a := rootfstest.Allocated(t, img); a > 64<<20 {
		t.Errorf("grown image allocates %d bytes: growing wrote more than metadata", a)
	}
}

// TestMakeExt4TooSmallIsErrNoSpace: content that does not fit is a clear
// ErrNoSpace and leaves no image file.
func TestMakeExt4TooSmallIsErrNoSpace(t *testing.T) {
	testenv.NeedRoot(t)
	dir, err := apply(t, Options{}, layer(t, file{Name: "f", Mode: 0o644, Body: strings.Repeat("data", 4<<20)}))
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "rootfs.ext4")
	err = MakeExt4(context.Background(), dir, img, 8<<20, 64)
	if !errors.Is(err, ErrNoSpace) {
		t.Errorf("16 MiB of data in an 8 MiB image: %v, want ErrNoSpace", err)
	}
	if _, serr := os.Stat(img); serr == nil {
		t.Error("a failed MakeExt4 left its image file")
	}
}

// freeBytes reads the free space of an ext4 image with dumpe2fs (no mount).
func freeBytes(t *testing.T, img string) int64 {
	t.Helper()
	out, err := exec.Command("dumpe2fs", "-h", img).CombinedOutput()
	if err != nil {
		t.Fatalf("dumpe2fs: %v: %s", err, out)
	}
	var free, bs int64
	for _, line := range strings.Split(string(out), "\n") {
		k, v, _ := strings.Cut(line, ":")
		v = strings.TrimSpace(v)
		switch k {
		case "Free blocks":
			free = atoi(v)
		case "Block size":
			bs = atoi(v)
		}
	}
	return free * bs
}

func atoi(s string) int64 {
	var n int64
	for _, c := range s {
		if c < '0' || c > '9' {
			break
		}
		n = n*10 + int64(c-'0')
	}
	return n
}
