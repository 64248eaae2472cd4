// Package loopfs makes real loopback filesystems (ext4, XFS with reflink,
// btrfs): a sparse image file, a loop device, a mount point. The fork-burst
// benchmark (`forkd bench`) runs on them, and internal/testfs builds the
// tests' helpers on them. It owns the image files, loop devices and mount
// points it creates and nothing else: Close unmounts its own mount point and
// detaches exactly the loop device it attached (after checking that device is
// still backed by its image), never "all loop devices".
//
// Images are sparse files in a temp dir, so a 512 MiB filesystem costs only
// the blocks mkfs and the caller actually write.
package loopfs

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/forkd/forkd/internal/mounts"
)

// Kind is a filesystem type loopfs can make.
type Kind string

const (
	Ext4  Kind = "ext4"
	XFS   Kind = "xfs"
	Btrfs Kind = "btrfs"
)

// Kinds lists every filesystem tests should cover, in a stable order.
var Kinds = []Kind{Ext4, XFS, Btrfs}

// DefaultSize is the sparse image size used by Pool: large enough for XFS
// (which refuses images under 300 MiB) and for test files of tens of MiB.
const DefaultSize int64 = 512 << 20

// Reflink reports whether files on this kind of filesystem can be cloned
// with FICLONE (as made by Mount: XFS with -m reflink=1, btrfs).
func (k Kind) Reflink() bool { return k == XFS || k == Btrfs }

// FS is one mounted loopback filesystem.
type FS struct {
	Kind   Kind
	Dir    string // mount point; the filesystem's root
	Image  string // backing image file
	Device string // loop device, e.g. /dev/loop3

	workDir string // holds Image and Dir; removed by Close
	closed  bool
}

// Lack is the kind of thing Missing found absent.
type Lack int

const (
	LackRoot Lack = iota + 1 // not running as root
	LackLoop                 // no loop devices, losetup, mount or umount
	LackMkfs                 // no mkfs tool for this filesystem
)

// Missing says what keeps loopback filesystems of kind from being made
// here, and why; (0, "") when nothing does.
func Missing(kind Kind) (Lack, string) {
	if os.Geteuid() != 0 {
		return LackRoot, fmt.Sprintf("loopfs: loopback %s needs root (euid %d)", kind, os.Geteuid())
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		return LackLoop, fmt.Sprintf("loopfs: loopback %s needs /dev/loop-control: %v", kind, err)
	}
	for _, tool := range []string{"losetup", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			return LackLoop, fmt.Sprintf("loopfs: loopback %s needs %s in PATH: %v", kind, tool, err)
		}
	}
	if _, err := exec.LookPath(mkfsTool(kind)); err != nil {
		return LackMkfs, fmt.Sprintf("loopfs: loopback %s needs %s in PATH: %v", kind, mkfsTool(kind), err)
	}
	return 0, ""
}

// Unavailable returns why loopback filesystems of kind cannot be made here,
// or "" when they can.
func Unavailable(kind Kind) string {
	_, why := Missing(kind)
	return why
}

func mkfsTool(kind Kind) string { return "mkfs." + string(kind) }

func mkfsArgs(kind Kind, image string) []string {
	switch kind {
	case Ext4:
		return []string{"-q", "-F", image}
	case XFS:
		// reflink=1 so FICLONE works (the default on newer xfsprogs, explicit here).
		return []string{"-q", "-f", "-m", "reflink=1", image}
	case Btrfs:
		return []string{"-q", "-f", image}
	}
	return nil
}

// Mount makes a sparse image of size bytes in a new temp dir, formats it as
// kind, attaches it to a free loop device and mounts it. The caller must
// Close it.
func Mount(kind Kind, size int64) (*FS, error) { return MountIn("", kind, size) }

// MountIn is Mount with the temp dir made in parent ("" is the system's temp
// dir). A test that snapshots the image (a power cut taken as a reflink of
// the image, on a filesystem with no shutdown ioctl) puts it on a
// filesystem that can reflink.
func MountIn(parent string, kind Kind, size int64) (_ *FS, err error) {
	if why := Unavailable(kind); why != "" {
		return nil, errors.New(why)
	}
	if mkfsArgs(kind, "") == nil {
		return nil, fmt.Errorf("loopfs: unknown filesystem kind %q", kind)
	}
	work, err := os.MkdirTemp(parent, "forkd-loopfs-"+string(kind)+"-")
	if err != nil {
		return nil, fmt.Errorf("loopfs: mount %s: %w", kind, err)
	}
	fs := &FS{Kind: kind, Image: filepath.Join(work, "fs.img"), Dir: filepath.Join(work, "mnt"), workDir: work}
	defer func() {
		if err != nil {
			fs.Close()
		}
	}()
	img, err := os.Create(fs.Image)
	if err != nil {
		return nil, fmt.Errorf("loopfs: mount %s: %w", kind, err)
	}
	err = img.Truncate(size)
	img.Close()
	if err != nil {
		return nil, fmt.Errorf("loopfs: mount %s: size image: %w", kind, err)
	}
	if _, err := run(mkfsTool(kind), mkfsArgs(kind, fs.Image)...); err != nil {
		return nil, fmt.Errorf("loopfs: mount %s: %w", kind, err)
	}
	if err := os.Mkdir(fs.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("loopfs: mount %s: %w", kind, err)
	}
	if err := fs.Attach(); err != nil {
		return nil, err
	}
	return fs, nil
}

// Attach attaches the image to a free loop device and mounts it on Dir:
// Mount's last step, and the way back after Unmount (the caller may have
// replaced the image file meanwhile).
func (f *FS) Attach() error {
	if f.Device != "" {
		return fmt.Errorf("loopfs: attach %s: already attached to %s", f.Image, f.Device)
	}
	// direct-io avoids caching every block twice (once for the image file on
	// the host fs, once for the filesystem on the loop device).
	// Two processes can race for the same free device; the loser gets EBUSY.
	var out string
	var err error
	for try := 0; try < 5; try++ {
		if out, err = run("losetup", "--find", "--show", "--direct-io=on", f.Image); err == nil || !strings.Contains(err.Error(), "busy") {
			break
		}
		time.Sleep(time.Duration(try+1) * 20 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("loopfs: mount %s: %w", f.Kind, err)
	}
	f.Device = strings.TrimSpace(out)
	if _, err := run("mount", "-t", string(f.Kind), f.Device, f.Dir); err != nil {
		return fmt.Errorf("loopfs: mount %s: %w", f.Kind, err)
	}
	return nil
}

// Unmount unmounts the filesystem and detaches its loop device but keeps the
// image, which then holds exactly what the filesystem wrote to its device;
// Attach mounts it again. Close after Unmount removes the image.
func (f *FS) Unmount() error {
	if f.Device == "" {
		return nil
	}
	if mounted(f.Dir) {
		if err := umount(f.Dir); err != nil {
			return err
		}
	}
	if err := f.detach(); err != nil {
		return err
	}
	f.Device = ""
	return nil
}

// Close unmounts the filesystem, detaches its loop device and removes the
// image. It is safe to call more than once and on a half-made FS.
func (f *FS) Close() error {
	if f.closed {
		return nil
	}
	f.closed = true
	var errs []error
	if f.Device != "" {
		if mounted(f.Dir) {
			if err := umount(f.Dir); err != nil {
				errs = append(errs, err)
			}
		}
		if err := f.detach(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		if err := os.RemoveAll(f.workDir); err != nil {
			errs = append(errs, fmt.Errorf("loopfs: remove %s: %w", f.workDir, err))
		}
	}
	return errors.Join(errs...)
}

// detach runs losetup -d on exactly the device Mount attached, and only if it
// is still backed by our image: a loop number can be reused by someone else
// once it is free, and detaching their device would break their mount.
func (f *FS) detach() error {
	if !f.attached() {
		back, _ := run("losetup", "--noheadings", "--list", "--output", "BACK-FILE", f.Device)
		return fmt.Errorf("loopfs: detach %s: backed by %q, not our image %s; left alone", f.Device, strings.TrimSpace(back), f.Image)
	}
	if _, err := run("losetup", "-d", f.Device); err != nil {
		return fmt.Errorf("loopfs: detach %s: %w", f.Device, err)
	}
	// If something (udev's blkid, a concurrent losetup --find) holds the
	// device open, the kernel only marks it autoclear and detaches it on the
	// last close. Wait for that, so a finished Close means a free device.
	for range 100 {
		if !f.attached() {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("loopfs: detach %s: still attached to %s after 5s (autoclear pending)", f.Device, f.Image)
}

// attached reports whether f.Device is still backed by f.Image.
func (f *FS) attached() bool {
	back, err := run("losetup", "--noheadings", "--list", "--output", "BACK-FILE", f.Device)
	if err != nil {
		return false // no such loop device configured
	}
	back = strings.TrimSpace(back)
	return back == f.Image || strings.HasPrefix(back, f.Image+" ")
}

func umount(dir string) error {
	var err error
	// A just-closed file can keep the mount busy for a moment; retry briefly.
	for range 20 {
		if _, err = run("umount", dir); err == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("loopfs: umount %s: %w", dir, err)
}

// mounted says whether dir is a mount point in this process's mount table.
func mounted(dir string) bool {
	table, err := mounts.Read(mounts.Self)
	if err != nil {
		return true // let umount decide
	}
	_, ok := table.At(dir)
	return ok
}

func run(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}
