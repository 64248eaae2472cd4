package rootfs

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/forkd/forkd/internal/rootfs/rootfstest"
	"github.com/forkd/forkd/internal/testenv"
)

type file = rootfstest.File

func layer(t *testing.T, files ...file) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := rootfstest.WriteTar(&b, files); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// apply unpacks layers into a fresh tree under a private temp dir and
// returns the tree's path and the first error.
func apply(t *testing.T, opts Options, layers ...[]byte) (string, error) {
	t.Helper()
	testenv.NeedRoot(t)
	dir := filepath.Join(t.TempDir(), "tree")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	tr, err := OpenTree(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	for _, l := range layers {
		if _, err := tr.Apply(context.Background(), bytes.NewReader(l)); err != nil {
			return dir, err
		}
	}
	return dir, tr.Finish()
}

func dirE(perm uint32) rootfstest.Entry { return rootfstest.Entry{Type: 'd', Perm: perm} }

// TestApplyFlattensLayersLikeARuntime applies three layers and checks the
// tree entry by entry: whiteouts and opaque directories hide lower layers,
// a hardlink reaches a file of a lower layer, and owners, setuid bits,
// xattrs, symlinks and device nodes arrive intact.
func TestApplyFlattensLayersLikeARuntime(t *testing.T) {
	l1 := layer(t,
		file{Name: "etc/", Type: tar.TypeDir, Mode: 0o755},
		file{Name: "etc/passwd", Mode: 0o644, Body: "root:x:0:0\n"},
		file{Name: "etc/gone", Mode: 0o644, Body: "deleted by layer 2"},
		file{Name: "opq/", Type: tar.TypeDir, Mode: 0o755},
		file{Name: "opq/old", Mode: 0o644, Body: "hidden by the opaque marker"},
		file{Name: "usr/bin/tool", Mode: 0o4755, UID: 0, GID: 0, Body: "#!/bin/true\n"},
		file{Name: "home/app/data", Mode: 0o600, UID: 1000, GID: 1000, Body: "mine"},
		file{Name: "bin", Type: tar.TypeSymlink, Link: "usr/bin"},
	)
	l2 := layer(t,
		file{Name: "etc/.wh.gone"},
		file{Name: "opq/", Type: tar.TypeDir, Mode: 0o750},
		file{Name: "opq/.wh..wh..opq"},
		file{Name: "opq/new", Mode: 0o644, Body: "kept"},
		file{Name: "usr/bin/tool-link", Type: tar.TypeLink, Link: "usr/bin/tool"},
		file{Name: "dev/null", Type: tar.TypeChar, Mode: 0o666, Major: 1, Minor: 3},
		file{Name: "dev/fifo", Type: tar.TypeFifo, Mode: 0o600},
		file{Name: "cap", Mode: 0o755, Body: "x", Xattrs: map[string]string{"user.forkd": "yes", "trusted.forkd": "t"}},
	)
	l3 := layer(t,
		file{Name: "bin/via-symlink", Mode: 0o755, Body: "written through bin -> usr/bin"},
		file{Name: "sparse", Mode: 0o644, Body: "head", Zeros: 64 << 20},
	)
	dir, err := apply(t, Options{}, l1, l2, l3)
	if err != nil {
		t.Fatal(err)
	}
	got, err := rootfstest.Walk(dir)
	if err != nil {
		t.Fatal(err)
	}
	sum := func(s string) string {
		tree := t.TempDir()
		os.WriteFile(filepath.Join(tree, "f"), []byte(s), 0o600)
		w, _ := rootfstest.Walk(tree)
		return w["f"].Sum
	}
	sparseSum := got["sparse"].Sum // content is checked by size and allocation below
	tool := rootfstest.Entry{Type: 'f', Perm: 0o4755, Size: 12, Sum: sum("#!/bin/true\n"), Group: "usr/bin/tool"}
	want := rootfstest.Tree{
		"etc":                 dirE(0o755),
		"etc/passwd":          {Type: 'f', Perm: 0o644, Size: 11, Sum: sum("root:x:0:0\n")},
		"opq":                 dirE(0o750),
		"opq/new":             {Type: 'f', Perm: 0o644, Size: 4, Sum: sum("kept")},
		"usr":                 dirE(0o755),
		"usr/bin":             dirE(0o755),
		"usr/bin/tool":        tool,
		"usr/bin/tool-link":   tool,
		"usr/bin/via-symlink": {Type: 'f', Perm: 0o755, Size: 30, Sum: sum("written through bin -> usr/bin")},
		"home":                dirE(0o755),
		"home/app":            dirE(0o755),
		"home/app/data":       {Type: 'f', Perm: 0o600, UID: 1000, GID: 1000, Size: 4, Sum: sum("mine")},
		"bin":                 {Type: 'l', Perm: 0o777, Link: "usr/bin"},
		"dev":                 dirE(0o755),
		"dev/null":            {Type: 'c', Perm: 0o666, Dev: 0x103},
		"dev/fifo":            {Type: 'p', Perm: 0o600},
		"cap":                 {Type: 'f', Perm: 0o755, Size: 1, Sum: sum("x"), Xattrs: map[string]string{"user.forkd": "yes", "trusted.forkd": "t"}},
		"sparse":              {Type: 'f', Perm: 0o644, Size: 4 + 64<<20, Sum: sparseSum},
		".":                   got["."],
	}
	if d := rootfstest.Diff(want, got); len(d) > 0 {
		t.Errorf("the applied tree differs from the flattened layers:\n%s", strings.Join(d, "\n"))
	}
	if a := rootfstest.Allocated(t, filepath.Join(dir, "sparse")); a > 1<<20 {
		t.Errorf("the 64 MiB file of zeros takes %d bytes: its zeros were written, not left as holes", a)
	}
}

// TestApplyIgnoringWhiteoutsKeepsDeletedFiles is the whiteout twin at the
// tree level: without whiteout handling the deleted and opaqued files stay.
func TestApplyIgnoringWhiteoutsKeepsDeletedFiles(t *testing.T) {
	l1 := layer(t, file{Name: "a/gone", Body: "x"}, file{Name: "o/old", Body: "y"})
	l2 := layer(t, file{Name: "a/.wh.gone"}, file{Name: "o/.wh..wh..opq"})
	for _, tc := range []struct {
		opts Options
		want bool // files still present
	}{{Options{}, false}, {Options{IgnoreWhiteouts: true}, true}} {
		dir, err := apply(t, tc.opts, l1, l2)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{"a/gone", "o/old"} {
			_, err := os.Lstat(filepath.Join(dir, p))
			if present := err == nil; present != tc.want {
				t.Errorf("IgnoreWhiteouts=%v: %s present=%v, want %v", tc.opts.IgnoreWhiteouts, p, present, tc.want)
			}
		}
	}
}

// escapeCases are layers that try to write outside the tree. The tree is
// <tmp>/a/b/tree, so "../.." from the tree lands in <tmp>, where the test
// looks for the file that must not appear.
func escapeCases(t *testing.T) []struct {
	name   string
	layers [][]byte
} {
	return []struct {
		name   string
		layers [][]byte
	}{
		{"dotdot name", [][]byte{layer(t, file{Name: "../../../escaped", Body: "x"})}},
		{"dotdot inside name", [][]byte{layer(t, file{Name: "x/../../../../escaped", Body: "x"})}},
		{"relative symlink parent", [][]byte{
			layer(t, file{Name: "up", Type: tar.TypeSymlink, Link: "../../.."}),
			layer(t, file{Name: "up/escaped", Body: "x"})}},
		{"symlink parent in the same layer", [][]byte{layer(t,
			file{Name: "up", Type: tar.TypeSymlink, Link: "../../.."},
			file{Name: "up/escaped", Body: "x"})}},
		{"absolute symlink parent", [][]byte{layer(t,
			file{Name: "abs", Type: tar.TypeSymlink, Link: "/"},
			file{Name: "abs/forkd-rootfs-escape-test", Body: "x"})}},
		{"hardlink out", [][]byte{layer(t, file{Name: "h", Type: tar.TypeLink, Link: "../../../outside"})}},
		{"hardlink through symlink", [][]byte{layer(t,
			file{Name: "up", Type: tar.TypeSymlink, Link: "../../.."},
			file{Name: "h", Type: tar.TypeLink, Link: "up/outside"})}},
		{"whiteout through symlink", [][]byte{layer(t,
			file{Name: "up", Type: tar.TypeSymlink, Link: "../../.."},
			file{Name: "up/.wh.outside"})}},
	}
}

// TestApplyRefusesEntriesThatEscapeTheRoot: every escape attempt is
// ErrUnsafe, and nothing outside the tree is created, changed or removed.
func TestApplyRefusesEntriesThatEscapeTheRoot(t *testing.T) {
	for _, tc := range escapeCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			outside, err := applyEscape(t, Options{}, tc.layers)
			if !errors.Is(err, ErrUnsafe) {
				t.Errorf("got %v, want ErrUnsafe", err)
			}
			if outside != "" {
				t.Errorf("the layer wrote outside the tree: %s", outside)
			}
		})
	}
}

// TestApplyEscapeTestCatchesAnUnguardedUnpack is the twin: with
// RESOLVE_BENEATH off, a symlinked parent leads out of the tree and the
// check above sees the file appear outside.
func TestApplyEscapeTestCatchesAnUnguardedUnpack(t *testing.T) {
	c := escapeCases(t)[2] // relative symlink parent: lands in the test's own temp dir
	outside, _ := applyEscape(t, Options{unsafeFollowSymlinks: true}, c.layers)
	if outside == "" {
		t.Fatal("without RESOLVE_BENEATH the symlinked write still did not escape: the escape test cannot fail")
	}
}

// applyEscape applies layers into <tmp>/a/b/tree, where <tmp> also holds
// "outside" (a file a whiteout or hardlink might touch), and reports what
// changed outside the tree.
func applyEscape(t *testing.T, opts Options, layers [][]byte) (changedOutside string, err error) {
	testenv.NeedRoot(t)
	top := t.TempDir()
	dir := filepath.Join(top, "a", "b", "tree")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	outside := filepath.Join(top, "outside")
	if err := os.WriteFile(outside, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	tr, err := OpenTree(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		if _, err = tr.Apply(context.Background(), bytes.NewReader(l)); err != nil {
			break
		}
	}
	tr.Close()
	var changed []string
	for _, p := range []string{filepath.Join(top, "escaped"), filepath.Join(top, "a", "escaped"), "/forkd-rootfs-escape-test"} {
		if _, serr := os.Lstat(p); serr == nil {
			changed = append(changed, p+" created")
			os.Remove(p)
		}
	}
	if b, rerr := os.ReadFile(outside); rerr != nil || string(b) != "keep" {
		changed = append(changed, outside+" changed or removed")
	}
	if info, serr := os.Stat(outside); serr == nil && info.Sys().(*syscall.Stat_t).Nlink != 1 {
		changed = append(changed, outside+" gained a hardlink")
	}
	return strings.Join(changed, ", "), err
}
