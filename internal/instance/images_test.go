package instance

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/image/imagetest"
	"github.com/forkd/forkd/internal/rootfs/rootfstest"
	"github.com/forkd/forkd/internal/testenv"
	"github.com/forkd/forkd/internal/testfs"
)

// testImage writes the rich test image as an OCI layout outside the data
// dir and returns its reference and the image.
func testImage(t *testing.T, sparse int64) (string, string) {
	t.Helper()
	img := imagetest.Rich(t, sparse)
	dir := filepath.Join(t.TempDir(), "layout")
	imagetest.WriteLayout(t, dir, "v1", img)
	return "oci:" + dir + ":v1", imagetest.Digest(t, img)
}

// TestVMFromImageAndTenForks boots a VM whose disk is the image's root
// filesystem grown to --disk-size, checks that disk's content against the
// flattened image, forks it ten times (each fork records the image and
// runs with its memory intact), and shows the image cannot be deleted
// while any of them uses it.
func TestVMFromImageAndTenForks(t *testing.T) {
	testenv.NeedRoot(t)
	testfs.Need(t, testfs.Ext4) // web's disk is mounted to read it back
	m := newTestManager(t)
	ctx := context.Background()
	ref, digest := testImage(t, 64<<20)
	web, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "web", MemoryMiB: testMemMiB,
		BootArgs: testBootArgs, Image: ref, DiskSizeMiB: 512})
	if err != nil {
		t.Fatal(err)
	}
	if web.State != api.StateRunning || web.Image != digest {
		t.Fatalf("web: state %s image %s, want Running from %s", web.State, web.Image, digest)
	}
	g, _ := m.layout.Guest(web.ID)
	if st, err := os.Stat(g.Rootfs()); err != nil || st.Size() != 512<<20 {
		t.Fatalf("web's disk: %v, size %d, want 512 MiB", err, st.Size())
	}
	got, err := rootfstest.Walk(rootfstest.MountExt4(t, g.Rootfs()))
	if err != nil {
		t.Fatal(err)
	}
	if d := rootfstest.Diff(imagetest.Flattened(t, imagetest.Rich(t, 64<<20)), got, "lost+found"); len(d) > 0 {
		t.Errorf("web's disk differs from the image:\n%s", strings.Join(d, "\n"))
	}
	verifyGuest(t, m, web.ID)

	action(t, m, "web", "standby")
	var wg sync.WaitGroup
	forks := make([]api.Instance, 10)
	errs := make([]error, 10)
	for i := range forks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			forks[i], errs[i] = m.ForkInstance(ctx, "web", api.ForkRequest{Name: fmt.Sprintf("web-%d", i+1), TargetState: api.StateRunning})
		}()
	}
	wg.Wait()
	for i, f := range forks {
		if errs[i] != nil {
			t.Fatalf("fork %d: %v", i+1, errs[i])
		}
		if f.Image != digest || f.State != api.StateRunning {
			t.Errorf("fork %s: image %q state %s, want %s Running", f.Name, f.Image, f.State, digest)
		}
		fg, _ := m.layout.Guest(f.ID)
		if st, err := os.Stat(fg.Rootfs()); err != nil || st.Size() != 512<<20 || sameInode(t, fg.Rootfs(), g.Rootfs()) {
			t.Errorf("fork %s's disk: %v (size %d): want its own 512 MiB copy", f.Name, err, st.Size())
		}
	}
	for _, f := range forks {
		verifyGuest(t, m, f.ID)
	}
	snap, err := m.CreateSnapshot(ctx, "web-1", api.SnapshotRequest{Name: "s1"})
	if err != nil || snap.Image != digest {
		t.Fatalf("snapshot of a fork: %v, image %q", err, snap.Image)
	}

	if err := m.DeleteImage(ctx, digest); !errors.Is(err, api.ErrInvalidState) {
		t.Errorf("delete an image 11 instances use: %v, want ErrInvalidState (409)", err)
	}
	if res, err := m.GCImages(ctx); err != nil || len(res.Deleted) != 0 {
		t.Errorf("GC with the image in use deleted %v (%v)", res.Deleted, err)
	}
	for _, in := range append(forks, web) {
		if err := m.DeleteInstance(ctx, in.ID); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.DeleteImage(ctx, digest); !errors.Is(err, api.ErrInvalidState) || !strings.Contains(err.Error(), "snapshot s1") {
		t.Errorf("delete an image a snapshot uses: %v, want ErrInvalidState naming snapshot s1", err)
	}
	if err := m.DeleteSnapshot(ctx, "s1"); err != nil {
		t.Fatal(err)
	}
	if err := m.DeleteImage(ctx, ref); err != nil {
		t.Errorf("delete the unused image by reference: %v", err)
	}
}

func sameInode(t *testing.T, a, b string) bool {
	t.Helper()
	sa, ea := os.Stat(a)
	sb, eb := os.Stat(b)
	return ea == nil && eb == nil && os.SameFile(sa, sb)
}

// TestBadImageCreatesLeaveNothing: an unknown image, a disk smaller than
// the image and image with rootfs are clear errors; no record, guest dir,
// image or open journal entry is left.
func TestBadImageCreatesLeaveNothing(t *testing.T) {
	testenv.NeedRoot(t)
	m := newTestManager(t)
	ctx := context.Background()
	ref, _ := testImage(t, 0)
	for _, tc := range []struct {
		name   string
		req    api.CreateInstanceRequest
		want   error
		text   string
		remote bool
	}{
		{"unknown image", api.CreateInstanceRequest{Image: "oci:/nonexistent/layout"}, api.ErrNotFound, "/nonexistent/layout", false},
		{"unknown digest", api.CreateInstanceRequest{Image: "sha256:" + strings.Repeat("0", 64)}, api.ErrNotFound, "pull it first", false},
		{"disk too small", api.CreateInstanceRequest{Image: ref, DiskSizeMiB: 1}, api.ErrInvalid, "at least", false},
		{"image and rootfs", api.CreateInstanceRequest{Image: ref, Rootfs: "/etc/hostname"}, api.ErrInvalid, "not both", false},
		{"bad reference", api.CreateInstanceRequest{Image: "oci:relative"}, api.ErrInvalid, "absolute", false},
		{"layout in the data dir", api.CreateInstanceRequest{Image: "oci:" + m.layout.ImagesDir()}, api.ErrInvalid, "data dir", false},
		{"layout under /proc", api.CreateInstanceRequest{Image: "docker-archive:/proc/self/environ"}, api.ErrInvalid, "/proc", false},
		{"layout over TCP outside host_path_dirs", api.CreateInstanceRequest{Image: ref}, api.ErrInvalid, "host_path_dirs", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.req.Name, tc.req.MemoryMiB, tc.req.BootArgs = "bad", testMemMiB, testBootArgs
			cctx := ctx
			if tc.remote {
				cctx = api.WithRemote(ctx)
			}
			_, err := m.CreateInstance(cctx, tc.req)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.text) {
				t.Errorf("got %v, want %v mentioning %q", err, tc.want, tc.text)
			}
			if list, _ := m.ListInstances(ctx); len(list) != 0 {
				t.Errorf("left %d instances", len(list))
			}
			if ents, _ := os.ReadDir(m.layout.JailsDir()); len(ents) != 0 {
				t.Errorf("left %d guest dirs", len(ents))
			}
			if open, _ := m.db.OpenEntries(ctx); len(open) != 0 {
				t.Errorf("left open journal entries: %+v", open)
			}
		})
	}
	// The too-small disk pulled the image first (a good image is kept).
	if list, _ := m.ListImages(ctx); len(list) != 1 {
		t.Errorf("%d images after the failed creates, want the one pulled", len(list))
	}
}

// TestSecondVMOfAnImageCostsNoDataOnXFS: on XFS a VM's disk is a reflink
// of the image, so a second VM (and a grown one) adds only metadata to
// the filesystem, not a copy of the image's data.
func TestSecondVMOfAnImageCostsNoDataOnXFS(t *testing.T) {
	testenv.NeedRoot(t)
	fs := testfs.Mount(t, testfs.XFS, 2<<30)
	m := newManagerAt(t, filepath.Join(fs.Dir, "d"))
	ctx := context.Background()
	img := imagetest.Image(t, "amd64", imagetest.RunConfig, imagetest.Layer(t,
		imagetest.File{Name: "data", Mode: 0o644, Body: strings.Repeat("incompressible? no, but real data. ", 3<<20)}))
	dir := filepath.Join(t.TempDir(), "layout")
	imagetest.WriteLayout(t, dir, "", img)
	ref := "oci:" + dir
	create := func(name string, diskMiB int) {
		t.Helper()
		f := false
		if _, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: name, Image: ref, DiskSizeMiB: diskMiB, Start: &f}); err != nil {
			t.Fatal(err)
		}
	}
	create("first", 0)
	im, err := m.GetImage(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if im.DiskBytes < 100<<20 {
		t.Fatalf("the image allocates only %d bytes; the test needs ~100 MiB of data to tell a copy from a reflink", im.DiskBytes)
	}
	before := used(t, fs.Dir)
	create("second", 0)
	create("grown", 1024)
	if grew := used(t, fs.Dir) - before; grew > im.DiskBytes/4 {
		t.Errorf("two more VMs of a %d-byte image used %d more bytes on XFS: their disks were copied, not reflinked", im.DiskBytes, grew)
	}
}

func used(t *testing.T, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

// TestImageMetrics: a pull is one build observed as ok, and the stored
// images are counted with the bytes they allocate.
func TestImageMetrics(t *testing.T) {
	testenv.NeedRoot(t)
	reg := prometheus.NewRegistry()
	m := newTestManager(t, func(c *Config) { c.Registerer = reg })
	ref, _ := testImage(t, 0)
	if _, err := m.images.Pull(context.Background(), ref, "", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := m.images.Pull(context.Background(), "oci:/nonexistent/layout", "", nil); err == nil {
		t.Fatal("pull of a missing layout succeeded")
	}
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range fams {
		for _, mm := range f.GetMetric() {
			switch {
			case mm.GetHistogram() != nil:
				for _, l := range mm.GetLabel() {
					got[f.GetName()+"{"+l.GetValue()+"}"] = float64(mm.GetHistogram().GetSampleCount())
				}
			case mm.GetGauge() != nil:
				got[f.GetName()] = mm.GetGauge().GetValue()
			}
		}
	}
	// The missing layout fails before a build starts: it is no build.
	if got["forkd_image_build_duration_seconds{ok}"] != 1 || got["forkd_image_build_duration_seconds{failed}"] != 0 ||
		got["forkd_images"] != 1 || got["forkd_image_disk_bytes"] <= 0 {
		t.Errorf("image metrics %v, want one ok build, 1 image and its bytes", got)
	}
}
