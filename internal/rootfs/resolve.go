package rootfs

import (
	"errors"
	"fmt"
	"path"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrUnsafe marks a layer entry that would write outside the tree: a name
// that climbs out with "..", or a parent that resolves outside the tree
// through a symlink.
var ErrUnsafe = errors.New("entry escapes the image root")

// beneath resolves rel (a cleaned, relative path) from the root fd without
// ever leaving it: RESOLVE_BENEATH fails with EXDEV on an absolute symlink or
// a ".." that climbs above root, and magic links (/proc/self/...) are refused.
const beneath = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS

// cleanName turns a tar entry name into a path relative to the root
// ("." for the root itself), or ErrUnsafe when it climbs out of it.
func cleanName(name string) (string, error) {
	p := path.Clean("/" + strings.TrimLeft(name, "/"))
	// Clean of a rooted path drops leading "..", so compare against the
	// name cleaned without the root: "a/../../b" must be refused, not
	// silently turned into "b".
	if rel := path.Clean(strings.TrimLeft(name, "/")); rel == ".." || strings.HasPrefix(rel, "../") {
		return "", fmt.Errorf("%w: %q climbs out of the root", ErrUnsafe, name)
	}
	if p == "/" {
		return ".", nil
	}
	return p[1:], nil
}

// openDir opens the directory rel beneath the tree's root (O_PATH: usable
// as the dirfd of *at calls). A resolution that would leave the root is
// ErrUnsafe.
func (t *Tree) openDir(rel string) (int, error) {
	fd, err := unix.Openat2(t.root, rel, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: t.resolve,
	})
	if err != nil {
		if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.ELOOP) {
			return -1, fmt.Errorf("%w: %q resolves outside the root through a symlink", ErrUnsafe, rel)
		}
		return -1, fmt.Errorf("open %q: %w", rel, err)
	}
	return fd, nil
}

// mkdirAll opens the directory rel beneath the root, creating missing
// components (mode 0755, owned by root, as a runtime does for a parent a
// layer does not list). created receives each path it made.
func (t *Tree) mkdirAll(rel string, created func(string)) (int, error) {
	fd, err := t.openDir(rel)
	if err == nil || !errors.Is(err, unix.ENOENT) {
		return fd, err
	}
	comps := strings.Split(rel, "/")
	parent, err := unix.Dup(t.root)
	if err != nil {
		return -1, err
	}
	for i, c := range comps {
		p := strings.Join(comps[:i+1], "/")
		next, err := t.openDir(p)
		if errors.Is(err, unix.ENOENT) {
			if err = unix.Mkdirat(parent, c, 0o755); err == nil || errors.Is(err, unix.EEXIST) {
				created(p)
				next, err = t.openDir(p)
			}
		}
		unix.Close(parent)
		if err != nil {
			return -1, err
		}
		parent = next
	}
	return parent, nil
}

// removeAll removes name (a single component) in the directory dirfd, and
// everything under it if it is a directory. It never follows a symlink:
// a symlink is unlinked, not descended. A missing name is not an error.
func removeAll(dirfd int, name string) error {
	err := unix.Unlinkat(dirfd, name, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if !errors.Is(err, unix.EISDIR) && !errors.Is(err, unix.EPERM) {
		return err
	}
	sub, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	names, err := readNames(sub)
	if err == nil {
		for _, n := range names {
			if err = removeAll(sub, n); err != nil {
				break
			}
		}
	}
	unix.Close(sub)
	if err != nil {
		return err
	}
	return unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR)
}

// readNames lists a directory fd opened O_RDONLY (not O_PATH), without "."
// and "..".
func readNames(fd int) ([]string, error) {
	var names []string
	buf := make([]byte, 32<<10)
	for {
		n, err := unix.Getdents(fd, buf)
		if err != nil {
			return nil, err
		}
		if n == 0 {
			return names, nil
		}
		_, _, names = unix.ParseDirent(buf[:n], -1, names)
	}
}
