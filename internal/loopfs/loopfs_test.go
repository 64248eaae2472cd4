package loopfs

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/testenv"
)

// need is testfs.Need (which this package cannot import: testfs imports it).
func need(t *testing.T, kind Kind) {
	t.Helper()
	key := map[Lack]string{LackRoot: testenv.Root, LackLoop: testenv.Loop}
	key[LackMkfs] = map[Kind]string{XFS: testenv.XFS, Btrfs: testenv.Btrfs}[kind]
	if key[LackMkfs] == "" {
		key[LackMkfs] = testenv.Loop
	}
	if lack, why := Missing(kind); lack != 0 {
		testenv.Need(t, key[lack], why)
	}
}

func TestMountMakesWritableFSAndCloseDetachesItsDevice(t *testing.T) {
	for _, kind := range Kinds {
		t.Run(string(kind), func(t *testing.T) {
			need(t, kind)
			fs, err := Mount(kind, DefaultSize)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { fs.Close() })
			if !mounted(fs.Dir) {
				t.Fatalf("%s not mounted after Mount", fs.Dir)
			}
			if err := os.WriteFile(filepath.Join(fs.Dir, "f"), []byte("x"), 0o600); err != nil {
				t.Fatalf("write on %s: %v", kind, err)
			}
			mi, _ := os.ReadFile("/proc/self/mountinfo")
			if !strings.Contains(string(mi), " "+string(kind)+" ") {
				t.Fatalf("no %s mount in mountinfo", kind)
			}
			if err := fs.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if mounted(fs.Dir) {
				t.Fatalf("%s still mounted after Close", fs.Dir)
			}
			if fs.attached() {
				t.Fatalf("%s still attached to %s after Close", fs.Device, fs.Image)
			}
			if _, err := os.Stat(fs.Image); !os.IsNotExist(err) {
				t.Fatalf("image %s left behind: %v", fs.Image, err)
			}
		})
	}
}

func TestDetachLeavesForeignDeviceAlone(t *testing.T) {
	need(t, Ext4)
	fs, err := Mount(Ext4, DefaultSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fs.Close() })
	// Pretend our device is backed by another image: detach must refuse.
	real := fs.Image
	fs.Image = real + ".someone-else"
	if err := fs.detach(); err == nil {
		t.Fatalf("detach of %s backed by %s succeeded; want refusal", fs.Device, real)
	}
	fs.Image = real
}

func TestUnmountKeepsTheImageAndAttachMountsItAgain(t *testing.T) {
	need(t, Ext4)
	parent := t.TempDir()
	fs, err := MountIn(parent, Ext4, DefaultSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fs.Close() })
	if !strings.HasPrefix(fs.Image, parent+"/") {
		t.Fatalf("image %s not under %s", fs.Image, parent)
	}
	if err := os.WriteFile(filepath.Join(fs.Dir, "f"), []byte("kept"), 0o600); err != nil {
		t.Fatal(err)
	}
	dev := fs.Device
	if err := fs.Unmount(); err != nil {
		t.Fatal(err)
	}
	if mounted(fs.Dir) || fs.Device != "" {
		t.Fatalf("after Unmount: mounted %v, device %q (was %s)", mounted(fs.Dir), fs.Device, dev)
	}
	if _, err := os.Stat(fs.Image); err != nil {
		t.Fatalf("Unmount removed the image: %v", err)
	}
	if err := fs.Attach(); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(fs.Dir, "f")); err != nil || string(b) != "kept" {
		t.Fatalf("after Attach: %q, %v; want the file written before Unmount", b, err)
	}
	if err := fs.Close(); err != nil {
		t.Fatal(err)
	}
	if fs.attached() || mounted(fs.Dir) {
		t.Fatalf("Close left %s attached or mounted", fs.Device)
	}
}

// A filesystem under a path with a space (written \040 in the kernel's
// mount table) is known to be mounted, so Unmount and Close unmount it
// before they detach its device, and nothing is left behind.
func TestCloseUnmountsAFilesystemUnderAPathWithASpace(t *testing.T) {
	need(t, Ext4)
	parent := filepath.Join(t.TempDir(), "a b")
	if err := os.Mkdir(parent, 0o700); err != nil {
		t.Fatal(err)
	}
	fs, err := MountIn(parent, Ext4, DefaultSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fs.Close() })
	if !mounted(fs.Dir) {
		t.Fatalf("%q not mounted after Mount", fs.Dir)
	}
	if err := fs.Unmount(); err != nil {
		t.Fatalf("Unmount: %v", err)
	}
	if mounted(fs.Dir) {
		t.Fatalf("%q still mounted after Unmount", fs.Dir)
	}
	if err := fs.Attach(); err != nil {
		t.Fatal(err)
	}
	if err := fs.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if mounted(fs.Dir) || fs.attached() {
		t.Fatalf("Close left %q mounted or %s attached", fs.Dir, fs.Device)
	}
	if _, err := os.Stat(fs.Image); !os.IsNotExist(err) {
		t.Fatalf("image %q left behind: %v", fs.Image, err)
	}
}
