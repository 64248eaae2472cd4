package hostpath

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Findings this package answers: `rootfs: /etc/shadow` (or a symlink to it)
// gave a VM disk byte-identical to it; `kernel: /proc/self/mem` was
// accepted; relative paths resolved against the daemon's working directory;
// a rootfs swapped for a FIFO between check and open hung the daemon in
// open for good. The accepted cases are the twins: the checks refuse what
// they must, not everything.
func TestOpenRefusesWhatIsNotAPlainHostFile(t *testing.T) {
	root := t.TempDir()
	data := filepath.Join(root, "data")
	allowed := filepath.Join(root, "images")
	elsewhere := filepath.Join(root, "elsewhere")
	for _, d := range []string{data, allowed, elsewhere} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write := func(p, content string) string {
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	disk := write(filepath.Join(allowed, "disk.img"), "allowed disk")
	other := write(filepath.Join(elsewhere, "disk.img"), "other disk")
	inData := write(filepath.Join(data, "forkd.db"), "db")
	link := filepath.Join(allowed, "link.img")
	os.Symlink(other, link)
	linkedDir := filepath.Join(allowed, "sub")
	os.Symlink(elsewhere, linkedDir)
	fifo := filepath.Join(allowed, "fifo.img")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	p := Policy{DataDir: data, Allowed: []string{allowed}}
	cases := []struct {
		name   string
		path   string
		remote bool
		ok     bool
		says   string
	}{
		{"a plain file over the socket", other, false, true, ""},
		{"a plain file under host_path_dirs over TCP", disk, true, true, ""},
		{"relative", "disk.img", false, false, "absolute"},
		{"/proc/self/mem", "/proc/self/mem", false, false, "/proc"},
		{"/sys", "/sys/kernel/mm/transparent_hugepage/enabled", false, false, "/sys"},
		{"/dev/null", "/dev/null", false, false, "/dev"},
		{"/etc/shadow over TCP", "/etc/shadow", true, false, "host_path_dirs"},
		{"outside host_path_dirs over TCP", other, true, false, "host_path_dirs"},
		{"escaping host_path_dirs with ..", allowed + "/../elsewhere/disk.img", true, false, "host_path_dirs"},
		{"a symlink to a file", link, false, false, "symlink"},
		{"through a symlinked dir", filepath.Join(linkedDir, "disk.img"), false, false, "symlink"},
		{"a FIFO", fifo, false, false, "regular file"},
		{"a directory", allowed, false, false, "regular file"},
		{"inside the data dir", inData, false, false, "data dir"},
		{"missing", filepath.Join(allowed, "nope"), false, false, "no such file"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			done := make(chan struct{})
			var f *os.File
			var err error
			go func() {
				defer close(done)
				f, err = p.Open("rootfs", tc.path, tc.remote)
			}()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				t.Fatalf("Open(%s) still blocked after 30 s", tc.path)
			}
			if tc.ok {
				if err != nil {
					t.Fatalf("Open(%s): %v", tc.path, err)
				}
				defer f.Close()
				b, _ := io.ReadAll(f)
				if want, _ := os.ReadFile(tc.path); string(b) != string(want) {
					t.Errorf("read %q through the handle, want %q", b, want)
				}
				return
			}
			if err == nil {
				f.Close()
				t.Fatalf("Open(%s) accepted it", tc.path)
			}
			if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.says) {
				t.Errorf("Open(%s): %v; want ErrRefused saying %q", tc.path, err, tc.says)
			}
		})
	}
}

// The fallback for kernels without openat2 refuses symlinks in any
// component just as openat2's RESOLVE_NO_SYMLINKS does.
func TestOpenNoSymlinksFallback(t *testing.T) {
	root := t.TempDir()
	real := filepath.Join(root, "real")
	os.MkdirAll(real, 0o755)
	os.WriteFile(filepath.Join(real, "f"), []byte("x"), 0o600)
	os.Symlink(real, filepath.Join(root, "via"))
	os.Symlink(filepath.Join(real, "f"), filepath.Join(real, "lf"))
	fd, err := openNoSymlinks(filepath.Join(real, "f"))
	if err != nil {
		t.Fatalf("plain file: %v", err)
	}
	syscall.Close(fd)
	for _, p := range []string{filepath.Join(root, "via", "f"), filepath.Join(real, "lf")} {
		if fd, err := openNoSymlinks(p); !errors.Is(err, syscall.ELOOP) {
			if err == nil {
				syscall.Close(fd)
			}
			t.Errorf("openNoSymlinks(%s): %v, want ELOOP", p, err)
		}
	}
}

// OpenBeneath accepts only regular files inside root reached through no
// symlink below it; root itself may be reached through one (it is trusted
// configuration). The first case is the twin.
func TestOpenBeneathConfinesToRoot(t *testing.T) {
	top := t.TempDir()
	root := filepath.Join(top, "data")
	os.MkdirAll(filepath.Join(root, "guests", "a"), 0o755)
	mem := filepath.Join(root, "guests", "a", "memory")
	os.WriteFile(mem, []byte("mem"), 0o600)
	outside := filepath.Join(top, "secret")
	os.WriteFile(outside, []byte("secret"), 0o600)
	os.Symlink(outside, filepath.Join(root, "guests", "a", "link"))
	os.Symlink(filepath.Join(top), filepath.Join(root, "guests", "up"))
	viaRoot := filepath.Join(top, "data-link")
	os.Symlink(root, viaRoot)
	for _, tc := range []struct {
		name, root, path string
		ok               bool
	}{
		{"a file inside", root, mem, true},
		{"inside, root reached through a symlink", viaRoot, filepath.Join(viaRoot, "guests", "a", "memory"), true},
		{"outside", root, outside, false},
		{"escaping with ..", root, root + "/guests/../../secret", false},
		{"a symlink inside pointing out", root, filepath.Join(root, "guests", "a", "link"), false},
		{"through a symlinked dir inside", root, filepath.Join(root, "guests", "up", "secret"), false},
		{"the root itself", root, root, false},
		{"a directory", root, filepath.Join(root, "guests"), false},
	} {
		// OpenBeneath, and Root.Open through one handle of the root held
		// open (a fork's several files): the same checks either way.
		for _, o := range []struct {
			name string
			open func() (*os.File, error)
		}{
			{"OpenBeneath", func() (*os.File, error) { return OpenBeneath("backing_path", tc.root, tc.path) }},
			{"Root.Open", func() (*os.File, error) {
				r, err := OpenRoot(tc.root)
				if err != nil {
					return nil, err
				}
				defer r.Close()
				return r.Open("backing_path", tc.path)
			}},
		} {
			t.Run(tc.name+"/"+o.name, func(t *testing.T) {
				f, err := o.open()
				if tc.ok {
					if err != nil {
						t.Fatalf("%s: %v", o.name, err)
					}
					f.Close()
					return
				}
				if err == nil {
					f.Close()
					t.Fatalf("%s accepted it", o.name)
				}
				if !errors.Is(err, ErrRefused) {
					t.Errorf("%s: %v; want ErrRefused", o.name, err)
				}
			})
		}
	}
}

// CheckBeneath accepts a path inside root through real directories whether
// or not the file exists yet (the twins), and refuses one outside root,
// through a symlinked directory, or that is itself a symlink.
func TestCheckBeneathConfinesToRoot(t *testing.T) {
	top := t.TempDir()
	root := filepath.Join(top, "data")
	os.MkdirAll(filepath.Join(root, "guests", "a", "snapshots"), 0o755)
	os.Symlink(top, filepath.Join(root, "guests", "up"))
	os.Symlink("/etc/passwd", filepath.Join(root, "guests", "a", "vmstate"))
	for _, tc := range []struct {
		path string
		ok   bool
	}{
		{filepath.Join(root, "guests", "a", "snapshots", "memory"), true},
		{filepath.Join(root, "guests", "a", "snapshots"), true},
		{"/etc/passwd", false},
		{filepath.Join(root, "guests", "up", "x"), false},
		{filepath.Join(root, "guests", "a", "vmstate"), false},
		{root + "/guests/../../x", false},
		{root, false},
	} {
		err := CheckBeneath("snapshot_path", root, tc.path)
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrRefused)) {
			t.Errorf("CheckBeneath(%s): %v; want ok=%v", tc.path, err, tc.ok)
		}
	}
}
