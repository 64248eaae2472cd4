package image_test

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/image"
	"github.com/forkd/forkd/internal/image/imagetest"
	"github.com/forkd/forkd/internal/rootfs"
	"github.com/forkd/forkd/internal/rootfs/rootfstest"
	"github.com/forkd/forkd/internal/store"
	"github.com/forkd/forkd/internal/testenv"
	"github.com/forkd/forkd/internal/testfs"
)

type env struct {
	s      *image.Store
	db     *store.Store
	layout guestdir.Layout
}

// newStore opens an image store on a fresh data dir (dataDir "" for a
// temp dir). Building images needs root.
func newStore(t *testing.T, dataDir string, mod func(*image.Config)) env {
	t.Helper()
	testenv.NeedRoot(t)
	if dataDir == "" {
		dataDir = t.TempDir()
	}
	l, err := guestdir.New(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	db, err := store.Open(context.Background(), l.DB())
	if err != nil {
		t.Fatal(err)
	}
	cfg := image.Config{Layout: l, DB: db, Headroom: 8 << 20, Logger: slog.New(slog.DiscardHandler)}
	if mod != nil {
		mod(&cfg)
	}
	s := image.New(cfg)
	if err := os.MkdirAll(l.ImagesDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(); db.Close() })
	return env{s: s, db: db, layout: l}
}

// checkNothingLeft: no image dir, temp dir, record or open journal entry.
func (e env) checkNothingLeft(t *testing.T) {
	t.Helper()
	ents, _ := os.ReadDir(e.layout.ImagesDir())
	for _, en := range ents {
		t.Errorf("left behind under images/: %s", en.Name())
	}
	if ims, _ := e.s.List(context.Background()); len(ims) > 0 {
		t.Errorf("left behind: %d image records", len(ims))
	}
	if open, _ := e.db.OpenEntries(context.Background()); len(open) > 0 {
		t.Errorf("left behind: open journal entries %+v", open)
	}
}

// TestPullBuildsTheFlattenedImage pulls a multi-layer image from the
// in-process registry and compares the ext4 it built, mounted read-only,
// with go-containerregistry's own flattening of the same image: paths,
// types, modes, owners, contents, link targets, device numbers, xattrs and
// hardlinks. The image records its run config, and stays sparse.
func TestPullBuildsTheFlattenedImage(t *testing.T) {
	testfs.Need(t, testfs.Ext4) // the built ext4 is mounted to read it back
	e := newStore(t, "", nil)
	reg := imagetest.NewRegistry(t)
	img := imagetest.Rich(t, 128<<20)
	ref := reg.Push(t, "forkd/rich:v1", img)

	var phases []string
	var mu sync.Mutex
	im, err := e.s.Pull(context.Background(), ref, "", func(p image.Progress) {
		mu.Lock()
		defer mu.Unlock()
		if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
			phases = append(phases, p.Phase)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if im.Digest != imagetest.Digest(t, img) {
		t.Errorf("image digest %s, want the manifest's %s", im.Digest, imagetest.Digest(t, img))
	}
	if fmt.Sprint(phases) != "[resolving fetching building done]" {
		t.Errorf("progress phases %v, want resolving, fetching, building, done", phases)
	}
	want := imagetest.RunConfig
	if fmt.Sprint(im.Run) != fmt.Sprint(image.RunConfig{Entrypoint: want.Entrypoint, Cmd: want.Cmd, Env: want.Env, WorkingDir: want.WorkingDir, User: want.User}) {
		t.Errorf("run config %+v, want %+v", im.Run, want)
	}
	if len(im.Refs) != 1 || im.Refs[0] != ref || im.Layers != 3 || im.Platform != image.DefaultPlatform() {
		t.Errorf("record: refs %v layers %d platform %s", im.Refs, im.Layers, im.Platform)
	}
	diff := contentDiff(t, e, im.Digest, img)
	if len(diff) > 0 {
		t.Errorf("the built ext4 differs from the flattened image:\n%s", strings.Join(diff, "\n"))
	}
	p, _ := e.s.Rootfs(im.Digest)
	if a := rootfstest.Allocated(t, p); a > 64<<20 || im.DiskBytes != a {
		t.Errorf("rootfs.ext4 allocates %d bytes (record says %d) for a 128 MiB sparse file: not sparse", a, im.DiskBytes)
	}
	if st, _ := os.Stat(p); st.Size() != im.SizeBytes {
		t.Errorf("rootfs.ext4 is %d bytes, record says %d", st.Size(), im.SizeBytes)
	}
}

// TestContentCheckCatchesIgnoredWhiteouts is the twin: a build that drops
// whiteout handling must make the content comparison fail.
func TestContentCheckCatchesIgnoredWhiteouts(t *testing.T) {
	testfs.Need(t, testfs.Ext4) // the built ext4 is mounted to read it back
	e := newStore(t, "", func(c *image.Config) { c.IgnoreWhiteouts = true })
	reg := imagetest.NewRegistry(t)
	img := imagetest.Rich(t, 1<<20)
	im, err := e.s.Pull(context.Background(), reg.Push(t, "forkd/rich:v1", img), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	diff := contentDiff(t, e, im.Digest, img)
	found := 0
	for _, d := range diff {
		if strings.HasPrefix(d, "etc/deleted.conf:") || strings.HasPrefix(d, "var/cache/old-1:") {
			found++
		}
	}
	if found != 2 {
		t.Fatalf("without whiteout handling the content check should report etc/deleted.conf and var/cache/old-1; it reported:\n%s", strings.Join(diff, "\n"))
	}
}

func contentDiff(t *testing.T, e env, digest string, img v1.Image) []string {
	t.Helper()
	p, err := e.s.Rootfs(digest)
	if err != nil {
		t.Fatal(err)
	}
	got, err := rootfstest.Walk(rootfstest.MountExt4(t, p))
	if err != nil {
		t.Fatal(err)
	}
	return rootfstest.Diff(imagetest.Flattened(t, img), got, "lost+found")
}

// TestConcurrentPullsShareOneDownloadAndBuild: eight pulls of one image at
// once (by tag and by digest) fetch each layer once and build once.
func TestConcurrentPullsShareOneDownloadAndBuild(t *testing.T) {
	e := newStore(t, "", nil)
	reg := imagetest.NewRegistry(t)
	img := imagetest.Rich(t, 8<<20)
	ref := reg.Push(t, "forkd/rich:v1", img)
	byDigest := reg.Ref("forkd/rich@" + imagetest.Digest(t, img))
	var wg sync.WaitGroup
	digests := make([]string, 8)
	errs := make([]error, 8)
	for i := range digests {
		r := ref
		if i%2 == 1 {
			r = byDigest
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			im, err := e.s.Pull(context.Background(), r, "", nil)
			digests[i], errs[i] = im.Digest, err
		}()
	}
	wg.Wait()
	for i := range digests {
		if errs[i] != nil || digests[i] != imagetest.Digest(t, img) {
			t.Errorf("pull %d: %s, %v", i, digests[i], errs[i])
		}
	}
	for _, d := range imagetest.LayerDigests(t, img) {
		if n := reg.BlobGets(d); n != 1 {
			t.Errorf("layer %s fetched %d times by 8 concurrent pulls, want 1", d, n)
		}
	}
	entries, _ := e.db.Entries(context.Background(), 100)
	builds := 0
	for _, en := range entries {
		if en.Kind == image.KindPull {
			builds++
		}
	}
	if builds != 1 {
		t.Errorf("%d image-pull builds journalled, want 1", builds)
	}
	im, _ := e.s.Lookup(context.Background(), ref)
	if len(im.Refs) != 2 {
		t.Errorf("refs %v, want the tag and the digest reference", im.Refs)
	}
}

// TestPlatformSelection: an index yields the manifest of the asked
// platform (the host's by default), identified by that manifest's digest.
func TestPlatformSelection(t *testing.T) {
	e := newStore(t, "", nil)
	reg := imagetest.NewRegistry(t)
	amd := imagetest.Image(t, "amd64", v1.Config{Cmd: []string{"amd"}}, imagetest.Layer(t, imagetest.File{Name: "arch", Body: "amd64"}))
	arm := imagetest.Image(t, "arm64", v1.Config{Cmd: []string{"arm"}}, imagetest.Layer(t, imagetest.File{Name: "arch", Body: "arm64"}))
	reg.PushIndex(t, "forkd/multi:v1", imagetest.Index(t, map[string]v1.Image{"linux/amd64": amd, "linux/arm64": arm}))
	ref := reg.Ref("forkd/multi:v1")
	for _, tc := range []struct {
		platform string
		want     v1.Image
	}{{"linux/arm64", arm}, {"linux/amd64", amd}} {
		im, err := e.s.Pull(context.Background(), ref, tc.platform, nil)
		if err != nil {
			t.Fatal(err)
		}
		if im.Digest != imagetest.Digest(t, tc.want) || im.Platform != tc.platform {
			t.Errorf("%s: digest %s platform %s, want the platform manifest %s", tc.platform, im.Digest, im.Platform, imagetest.Digest(t, tc.want))
		}
	}
	if image.DefaultPlatform() == "linux/amd64" {
		im, _ := e.s.Pull(context.Background(), ref, "", nil)
		if im.Digest != imagetest.Digest(t, amd) {
			t.Errorf("default platform pulled %s, want amd64's %s", im.Digest, imagetest.Digest(t, amd))
		}
	}
}

// TestPullFromLayoutAndArchive: oci:PATH[:TAG] and docker-archive:PATH
// give the same image (same digest) as the registry.
func TestPullFromLayoutAndArchive(t *testing.T) {
	e := newStore(t, "", nil)
	img := imagetest.Rich(t, 1<<20)
	other := imagetest.Image(t, "amd64", v1.Config{}, imagetest.Layer(t, imagetest.File{Name: "other", Body: "x"}))
	dir := t.TempDir()
	one := filepath.Join(dir, "one")
	imagetest.WriteLayout(t, one, "", img)
	two := filepath.Join(dir, "two:with:colons")
	imagetest.WriteLayout(t, two, "v1", img)
	imagetest.WriteLayout(t, two, "v2", other)
	three := filepath.Join(dir, "three")
	imagetest.WriteLayout(t, three, "v1", img)
	imagetest.WriteLayout(t, three, "v2", other)
	archive := filepath.Join(dir, "img.tar")
	imagetest.WriteArchive(t, archive, "example.com/rich:v1", img)

	want := imagetest.Digest(t, img)
	for _, ref := range []string{"oci:" + one, "oci:" + two + ":v1", "docker-archive:" + archive} {
		im, err := e.s.Pull(context.Background(), ref, "", nil)
		if err != nil {
			t.Errorf("%s: %v", ref, err)
			continue
		}
		if ref != "docker-archive:"+archive && im.Digest != want {
			t.Errorf("%s: digest %s, want %s", ref, im.Digest, want)
		}
	}
	if _, err := e.s.Pull(context.Background(), "oci:"+three, "", nil); !errors.Is(err, image.ErrInvalidRef) {
		t.Errorf("oci layout with two images and no tag: %v, want ErrInvalidRef", err)
	}
	if _, err := e.s.Pull(context.Background(), "oci:"+two+":v3", "", nil); !errors.Is(err, image.ErrNotFound) {
		t.Errorf("oci layout without that tag: %v, want ErrNotFound", err)
	}
}

func TestParseRefFollowsSkopeosTagRule(t *testing.T) {
	for _, tc := range []struct{ in, transport, path, tag, canon string }{
		{"oci:/srv/img", "oci", "/srv/img", "", "oci:/srv/img"},
		{"oci:/srv/img:v1", "oci", "/srv/img", "v1", "oci:/srv/img:v1"},
		{"oci:/srv/a:b/img", "oci", "/srv/a:b/img", "", "oci:/srv/a:b/img"},
		{"oci:/srv/a:b/img:latest", "oci", "/srv/a:b/img", "latest", "oci:/srv/a:b/img:latest"},
		{"docker-archive:/tmp/x.tar", "docker-archive", "/tmp/x.tar", "", "docker-archive:/tmp/x.tar"},
		{"alpine", "docker", "", "", "index.docker.io/library/alpine:latest"},
		{"docker://alpine:3.20", "docker", "", "", "index.docker.io/library/alpine:3.20"},
		{"127.0.0.1:5000/x/y:t", "docker", "", "", "127.0.0.1:5000/x/y:t"},
	} {
		r, err := image.ParseRef(tc.in)
		if err != nil {
			t.Errorf("%s: %v", tc.in, err)
			continue
		}
		if r.Transport != tc.transport || r.Path != tc.path || r.Tag != tc.tag || r.String() != tc.canon {
			t.Errorf("%s: got %s %q %q %q, want %s %q %q %q", tc.in, r.Transport, r.Path, r.Tag, r.String(), tc.transport, tc.path, tc.tag, tc.canon)
		}
	}
	for _, bad := range []string{"", "oci:relative/dir", "docker-archive:", "dir:/x", "UPPER/case", "a b"} {
		if _, err := image.ParseRef(bad); !errors.Is(err, image.ErrInvalidRef) {
			t.Errorf("%q: %v, want ErrInvalidRef", bad, err)
		}
	}
}

// TestBadImagesAreClearErrorsThatLeaveNothing: each bad input (unknown
// repository, tag or platform, an unreachable registry, a corrupt layer, an
// entry escaping the tree) fails with its own sentinel and leaves no dir, record or open
// journal entry.
func TestBadImagesAreClearErrorsThatLeaveNothing(t *testing.T) {
	e := newStore(t, "", nil)
	reg := imagetest.NewRegistry(t)
	good := imagetest.Rich(t, 1<<20)
	reg.Push(t, "forkd/good:v1", good)
	corrupt := imagetest.Image(t, "amd64", v1.Config{}, imagetest.Layer(t, imagetest.File{Name: "a", Body: strings.Repeat("corrupt me ", 1000)}))
	reg.Push(t, "forkd/corrupt:v1", corrupt)
	reg.Tamper(imagetest.LayerDigests(t, corrupt)[0])
	evil := imagetest.Image(t, "amd64", v1.Config{},
		imagetest.Layer(t, imagetest.File{Name: "ok", Body: "fine"}),
		imagetest.Layer(t, imagetest.File{Name: "../../../../forkd-image-escape", Body: "x"}))
	reg.Push(t, "forkd/evil:v1", evil)
	evilLink := imagetest.Image(t, "amd64", v1.Config{},
		imagetest.Layer(t, imagetest.File{Name: "etc", Type: '2', Link: "/etc"}),
		imagetest.Layer(t, imagetest.File{Name: "etc/forkd-image-escape", Body: "x"}))
	reg.Push(t, "forkd/evil-link:v1", evilLink)

	for _, tc := range []struct {
		name, ref, platform string
		want                error
		text                string
	}{
		{"unknown repository", reg.Ref("forkd/nope:v1"), "", image.ErrNotFound, "forkd/nope"},
		{"unknown tag", reg.Ref("forkd/good:v9"), "", image.ErrNotFound, "v9"},
		{"unreachable registry", "127.0.0.1:1/forkd/good:v1", "", image.ErrUnreachable, "127.0.0.1:1"},
		{"unknown platform", reg.Ref("forkd/good:v1"), "linux/s390x", image.ErrPlatform, "linux/s390x"},
		{"layer digest mismatch", reg.Ref("forkd/corrupt:v1"), "", image.ErrCorrupt, ""},
		{"traversal entry", reg.Ref("forkd/evil:v1"), "", rootfs.ErrUnsafe, "forkd-image-escape"},
		{"write through an absolute symlink", reg.Ref("forkd/evil-link:v1"), "", rootfs.ErrUnsafe, "etc"},
		{"bad platform", reg.Ref("forkd/good:v1"), "linux", image.ErrInvalidRef, "platform"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.s.Pull(context.Background(), tc.ref, tc.platform, nil)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.text) {
				t.Errorf("got %v, want %v mentioning %q", err, tc.want, tc.text)
			}
			e.checkNothingLeft(t)
		})
	}
	for _, p := range []string{"/forkd-image-escape", "/etc/forkd-image-escape"} {
		if _, err := os.Lstat(p); err == nil {
			os.Remove(p)
			t.Errorf("a malicious layer wrote %s on the host", p)
		}
	}
}

// TestFullDiskIsAClearErrorThatLeavesNothing: a data dir on a small
// filesystem runs out of room mid-build: ErrNoSpace, and nothing is left.
func TestFullDiskIsAClearErrorThatLeavesNothing(t *testing.T) {
	fs := testfs.Mount(t, testfs.Ext4, 48<<20)
	if err := os.Mkdir(filepath.Join(fs.Dir, "data"), 0o700); err != nil {
		t.Fatal(err)
	}
	e := newStore(t, filepath.Join(fs.Dir, "data"), nil)
	reg := imagetest.NewRegistry(t)
	big := imagetest.Image(t, "amd64", v1.Config{}, imagetest.Layer(t,
		imagetest.File{Name: "big", Body: strings.Repeat("not zeros, ", 6<<20)})) // 66 MiB of data
	_, err := e.s.Pull(context.Background(), reg.Push(t, "forkd/big:v1", big), "", nil)
	if !errors.Is(err, rootfs.ErrNoSpace) {
		t.Errorf("pull onto a full disk: %v, want ErrNoSpace", err)
	}
	e.checkNothingLeft(t)
}

// TestRegistryCredentialsComeFromTheDockerConfig: a registry that needs
// basic auth is refused without credentials (ErrUnauthorized) and pulled
// with the auths entry of $DOCKER_CONFIG/config.json.
func TestRegistryCredentialsComeFromTheDockerConfig(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	img := imagetest.Image(t, "amd64", v1.Config{}, imagetest.Layer(t, imagetest.File{Name: "secret", Body: "s"}))
	ref := reg.Push(t, "forkd/private:v1", img)
	reg.RequireBasicAuth("forkd", "s3cret")

	cfgDir := t.TempDir()
	t.Setenv("DOCKER_CONFIG", cfgDir)
	e := newStore(t, "", nil)
	if _, err := e.s.Pull(context.Background(), ref, "", nil); !errors.Is(err, image.ErrUnauthorized) {
		t.Fatalf("pull without credentials: %v, want ErrUnauthorized", err)
	}
	auth := base64.StdEncoding.EncodeToString([]byte("forkd:s3cret"))
	if err := os.WriteFile(filepath.Join(cfgDir, "config.json"),
		[]byte(fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, reg.Host, auth)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := e.s.Pull(context.Background(), ref, "", nil); err != nil {
		t.Fatalf("pull with the Docker config's credentials: %v", err)
	}
}

// TestDeleteRefusesAnImageInUseAndGCKeepsIt: an image an instance records
// is ErrInUse for Delete and survives GC; unused ones go.
func TestDeleteRefusesAnImageInUseAndGCKeepsIt(t *testing.T) {
	e := newStore(t, "", nil)
	dir := t.TempDir()
	a := imagetest.Image(t, "amd64", v1.Config{}, imagetest.Layer(t, imagetest.File{Name: "a", Body: "a"}))
	b := imagetest.Image(t, "amd64", v1.Config{}, imagetest.Layer(t, imagetest.File{Name: "b", Body: "b"}))
	imagetest.WriteLayout(t, filepath.Join(dir, "a"), "", a)
	imagetest.WriteLayout(t, filepath.Join(dir, "b"), "", b)
	ctx := context.Background()
	ia, err := e.s.Pull(ctx, "oci:"+filepath.Join(dir, "a"), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	ib, err := e.s.Pull(ctx, "oci:"+filepath.Join(dir, "b"), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.db.CreateInstance(ctx, store.Instance{ID: "i1", Name: "web", State: "Stopped", Vcpus: 1, MemoryMiB: 64, Image: ia.Digest}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.s.Delete(ctx, ia.Digest[:16]); !errors.Is(err, image.ErrInUse) || !strings.Contains(err.Error(), "instance web") {
		t.Errorf("delete an image in use: %v, want ErrInUse naming instance web", err)
	}
	gone, err := e.s.GC(ctx)
	if err != nil || len(gone) != 1 || gone[0].Digest != ib.Digest {
		t.Errorf("GC removed %v (%v), want only the unused image %s", gone, err, ib.Digest)
	}
	if _, err := e.s.Lookup(ctx, "oci:"+filepath.Join(dir, "a")); err != nil {
		t.Errorf("the image in use is gone after GC: %v", err)
	}
	if d, _ := e.layout.Image(ib.Digest); dirExists(d.Dir) {
		t.Error("GC left the unused image's dir")
	}
	e.db.DeleteInstance(ctx, "i1")
	if _, err := e.s.Delete(ctx, "oci:"+filepath.Join(dir, "a")); err != nil {
		t.Errorf("delete by reference once unused: %v", err)
	}
	e.checkNothingLeft(t)
}

func dirExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// TestSweepDeletesOnlyWhatItCanProve: under images/, forkd's temp dirs
// are removed; an unrecorded image dir the journal never named, and a
// symlink with an image dir's name, are set aside (lost+found); other
// names are left alone; a recorded image is kept.
func TestSweepDeletesOnlyWhatItCanProve(t *testing.T) {
	e := newStore(t, "", nil)
	ctx := context.Background()
	dir := t.TempDir()
	imagetest.WriteLayout(t, dir, "", imagetest.Image(t, "amd64", v1.Config{}, imagetest.Layer(t, imagetest.File{Name: "f", Body: "x"})))
	kept, err := e.s.Pull(ctx, "oci:"+dir, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	hex := func(c string) string { return strings.Repeat(c, 64) }
	root := e.layout.ImagesDir()
	for _, d := range []string{".tmp-sha256-" + hex("a"), ".tmp-sha256-" + hex("b") + ".deleting", "sha256-" + hex("c"), "not-forkds"} {
		if err := os.MkdirAll(filepath.Join(root, d, "x"), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	target := t.TempDir()
	if err := os.Symlink(target, filepath.Join(root, "sha256-"+hex("d"))); err != nil {
		t.Fatal(err)
	}
	var aside []string
	err = e.s.Sweep(ctx, func(d, name string) (string, error) {
		aside = append(aside, name)
		return "", os.Rename(filepath.Join(d, name), filepath.Join(t.TempDir(), name))
	})
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	ents, _ := os.ReadDir(root)
	for _, en := range ents {
		left = append(left, en.Name())
	}
	kd, _ := e.layout.Image(kept.Digest)
	want := []string{"not-forkds", filepath.Base(kd.Dir)}
	if fmt.Sprint(left) != fmt.Sprint(want) && fmt.Sprint(left) != fmt.Sprint([]string{want[1], want[0]}) {
		t.Errorf("left under images/: %v, want %v", left, want)
	}
	if fmt.Sprint(aside) != fmt.Sprint([]string{"sha256-" + hex("c"), "sha256-" + hex("d")}) {
		t.Errorf("set aside %v, want the unrecorded dir and the symlink", aside)
	}
	if _, err := os.Stat(target); err != nil {
		t.Errorf("the sweep followed the symlink: %v", err)
	}
}

// TestStepHookSeesExactlyTheDeclaredSteps: a pull and a delete call the
// step hook with every step JournalSteps declares for their kinds, in
// order, and with no other (the manager's crash hook panics on an
// undeclared step; the crash suite has a case per declared one).
func TestStepHookSeesExactlyTheDeclaredSteps(t *testing.T) {
	var mu sync.Mutex
	got := map[string][]string{}
	e := newStore(t, "", func(c *image.Config) {
		c.StepHook = func(kind, step string) {
			mu.Lock()
			defer mu.Unlock()
			got[kind] = append(got[kind], step)
		}
	})
	dir := t.TempDir()
	imagetest.WriteLayout(t, dir, "", imagetest.Image(t, "amd64", v1.Config{}, imagetest.Layer(t, imagetest.File{Name: "f", Body: "x"})))
	if _, err := e.s.Pull(context.Background(), "oci:"+dir, "", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := e.s.Delete(context.Background(), "oci:"+dir); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(image.JournalSteps()) {
		t.Errorf("steps recorded %v, declared %v", got, image.JournalSteps())
	}
}
