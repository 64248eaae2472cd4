package memfile

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A mem-file, kernel or disk forkd shares or clones may lie in a directory a
// jailed VMM owns, which can swap any name there for a symlink to a file it
// must never reach (another VM's memory, a host secret). Every share, clone
// and unshare refuses a symlink as its source and never reads its target.
func TestNothingFollowsASymlinkedSource(t *testing.T) {
	dir := t.TempDir()
	secret := filepath.Join(dir, "secret")
	writeSparse(t, secret, page, extent{0, fill(page, 7)})
	link := filepath.Join(dir, "memory")
	if err := os.Symlink(secret, link); err != nil {
		t.Fatal(err)
	}
	o := Options{}
	for name, op := range map[string]func(dst string) error{
		"ShareForFork": func(dst string) error { _, err := o.ShareForFork(link, dst); return err },
		"ShareInto":    func(dst string) error { _, err := o.ShareInto(link, dst); return err },
		"Clone":        func(dst string) error { _, err := o.Clone(link, dst); return err },
		"CloneInto":    func(dst string) error { _, err := o.CloneInto(link, dst); return err },
		"Copy":         func(dst string) error { return o.Copy(link, dst) },
		"CopyInto":     func(dst string) error { return o.CopyInto(link, dst) },
	} {
		dst := filepath.Join(dir, "out-"+name)
		err := op(dst)
		if err == nil || !strings.Contains(err.Error(), "symlink") {
			t.Errorf("%s from a symlink: err = %v, want a refusal naming the symlink", name, err)
		}
		if _, serr := os.Lstat(dst); serr == nil {
			t.Errorf("%s from a symlink made %s", name, dst)
		}
	}
	if _, err := o.EnsureExclusive(link); err == nil {
		t.Errorf("EnsureExclusive of a symlink: no error")
	}
	if b, _ := os.ReadFile(secret); b[0] != 7 || stat(t, secret).Nlink != 1 {
		t.Errorf("the symlink's target was touched")
	}
}

// ShareFileInto links the inode the caller opened, not what the name holds
// by the time of the link: swapping the name after the open changes nothing.
func TestShareFileLinksTheOpenedInode(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "memory")
	writeSparse(t, src, page, extent{0, fill(page, 1)})
	f, err := OpenSource(src)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := stat(t, src).Ino
	// Swap the name for another file.
	if err := os.Rename(src, src+".old"); err != nil {
		t.Fatal(err)
	}
	writeSparse(t, src, page, extent{0, fill(page, 2)})
	dst := filepath.Join(dir, "fork-memory")
	res, err := Options{}.ShareFileInto(f, dst)
	if err != nil || res.Mode != ModeHardlink {
		t.Fatalf("ShareFileInto = %+v, %v", res, err)
	}
	if got := stat(t, dst).Ino; got != want {
		t.Errorf("linked inode %d, want the opened one %d", got, want)
	}
}
