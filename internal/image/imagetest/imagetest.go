// Package imagetest builds container images for tests and serves them from
// an in-process OCI registry (go-containerregistry's pkg/registry) that
// listens on loopback only: nothing a test pulls leaves the machine. Only
// tests and benchmarks import it.
package imagetest

import (
	"archive/tar"
	"compress/gzip"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/forkd/forkd/internal/rootfs/rootfstest"
)

// File is one entry of a test layer.
type File = rootfstest.File

// Layer makes a gzip layer (fastest level: tests push hundreds of MiB of
// zeros) whose tar is regenerated from files on every read.
func Layer(t testing.TB, files ...File) v1.Layer {
	t.Helper()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		pr, pw := io.Pipe()
		go func() { pw.CloseWithError(rootfstest.WriteTar(pw, files)) }()
		return pr, nil
	}, tarball.WithCompressionLevel(gzip.BestSpeed))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Image makes a linux image for arch from layers with a run config.
func Image(t testing.TB, arch string, cfg v1.Config, layers ...v1.Layer) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Config = "linux", arch, cfg
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	return img
}

// RunConfig is the run config of Rich.
var RunConfig = v1.Config{Entrypoint: []string{"/usr/bin/app"}, Cmd: []string{"--serve", "80"},
	Env: []string{"PATH=/usr/bin:/bin", "MODE=test"}, WorkingDir: "/srv", User: "1000:1000"}

// RichLayers are the layers of Rich: files deleted through whiteouts, an
// opaque directory, hardlinks across layers, symlinks (relative and
// absolute), a device node, setuid and setgid bits, xattrs, owners, and a
// sparse file of sparseBytes zeros after a header.
func RichLayers(t testing.TB, sparseBytes int64) []v1.Layer {
	t.Helper()
	return []v1.Layer{
		Layer(t,
			File{Name: "etc/", Type: tar.TypeDir, Mode: 0o755},
			File{Name: "etc/passwd", Mode: 0o644, Body: "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/srv:/bin/sh\n"},
			File{Name: "etc/deleted.conf", Mode: 0o644, Body: "whited out by layer 2"},
			File{Name: "var/cache/", Type: tar.TypeDir, Mode: 0o755},
			File{Name: "var/cache/old-1", Mode: 0o644, Body: "hidden by an opaque dir"},
			File{Name: "var/cache/sub/old-2", Mode: 0o644, Body: "hidden too"},
			File{Name: "usr/bin/app", Mode: 0o755, Body: "#!/bin/sh\necho app\n"},
			File{Name: "usr/bin/passwd", Mode: 0o4755, Body: "setuid"},
			File{Name: "usr/bin/wall", Mode: 0o2755, GID: 5, Body: "setgid"},
			File{Name: "usr/lib/libc.so", Mode: 0o755, Body: strings.Repeat("libc", 4096)},
			File{Name: "bin", Type: tar.TypeSymlink, Link: "usr/bin"},
			File{Name: "srv/", Type: tar.TypeDir, Mode: 0o750, UID: 1000, GID: 1000},
			File{Name: "srv/data", Mode: 0o640, UID: 1000, GID: 1000, Body: "owned by app"},
		),
		Layer(t,
			File{Name: "etc/.wh.deleted.conf"},
			File{Name: "var/cache/", Type: tar.TypeDir, Mode: 0o700},
			File{Name: "var/cache/.wh..wh..opq"},
			File{Name: "var/cache/new", Mode: 0o644, Body: "the only entry left"},
			File{Name: "usr/lib/libc.so.6", Type: tar.TypeLink, Link: "usr/lib/libc.so"},
			File{Name: "lib64", Type: tar.TypeSymlink, Link: "/usr/lib"},
			File{Name: "dev/", Type: tar.TypeDir, Mode: 0o755},
			File{Name: "dev/null", Type: tar.TypeChar, Mode: 0o666, Major: 1, Minor: 3},
			File{Name: "usr/bin/ping", Mode: 0o755, Body: "ping", Xattrs: map[string]string{
				"security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"}},
			File{Name: "srv/tagged", Mode: 0o644, Body: "x", Xattrs: map[string]string{"user.forkd.test": "value"}},
		),
		Layer(t,
			File{Name: "usr/bin/app", Mode: 0o755, Body: "#!/bin/sh\necho app v2\n"},
			File{Name: "srv/data.link", Type: tar.TypeLink, Link: "srv/data"},
			File{Name: "srv/sparse.img", Mode: 0o644, Body: "header", Zeros: sparseBytes},
			File{Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
		),
	}
}

// Rich is the image the content tests pull: RichLayers and RunConfig.
func Rich(t testing.TB, sparseBytes int64) v1.Image {
	return Image(t, "amd64", RunConfig, RichLayers(t, sparseBytes)...)
}

// Registry is an in-process registry on a loopback port.
type Registry struct {
	Host string // 127.0.0.1:PORT
	srv  *httptest.Server

	mu        sync.Mutex      // guards the fields below
	blobGets  map[string]int  // digest → GETs of that blob
	tamper    map[string]bool // digests whose bytes are served corrupted
	basicAuth [2]string       // user, password; "" for none
}

// NewRegistry starts a registry that the test's cleanup stops.
func NewRegistry(t testing.TB) *Registry {
	t.Helper()
	r := &Registry{blobGets: map[string]int{}, tamper: map[string]bool{}}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		user, pass := r.basicAuth[0], r.basicAuth[1]
		r.mu.Unlock()
		if user != "" {
			if u, p, ok := req.BasicAuth(); !ok || u != user || p != pass {
				w.Header().Set("WWW-Authenticate", `Basic realm="forkd-test"`)
				http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"who are you"}]}`, http.StatusUnauthorized)
				return
			}
		}
		if req.Method == http.MethodGet && strings.Contains(req.URL.Path, "/blobs/sha256:") {
			d := req.URL.Path[strings.LastIndex(req.URL.Path, "/")+1:]
			r.mu.Lock()
			r.blobGets[d]++
			bad := r.tamper[d]
			r.mu.Unlock()
			if bad {
				inner.ServeHTTP(&flipWriter{ResponseWriter: w}, req)
				return
			}
		}
		inner.ServeHTTP(w, req)
	}))
	t.Cleanup(r.srv.Close)
	r.Host = strings.TrimPrefix(r.srv.URL, "http://")
	return r
}

// Ref is HOST/repo:tag on this registry.
func (r *Registry) Ref(repoTag string) string { return r.Host + "/" + repoTag }

// Push uploads img as repo:tag.
func (r *Registry) Push(t testing.TB, repoTag string, img v1.Image) string {
	t.Helper()
	ref, err := name.ParseReference(r.Ref(repoTag))
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return ref.Name()
}

// PushIndex uploads a multi-platform index as repo:tag.
func (r *Registry) PushIndex(t testing.TB, repoTag string, idx v1.ImageIndex) {
	t.Helper()
	ref, err := name.ParseReference(r.Ref(repoTag))
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatalf("push index %s: %v", ref, err)
	}
}

// BlobGets is how many times the blob was fetched.
func (r *Registry) BlobGets(digest string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.blobGets[digest]
}

// Tamper makes the registry flip one byte of the blob whenever it serves it.
func (r *Registry) Tamper(digest string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.tamper[digest] = true
}

// RequireBasicAuth makes every request need these credentials.
func (r *Registry) RequireBasicAuth(user, password string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.basicAuth = [2]string{user, password}
}

// flipWriter corrupts the first byte of a response body.
type flipWriter struct {
	http.ResponseWriter
	flipped bool
}

func (f *flipWriter) Write(b []byte) (int, error) {
	if !f.flipped && len(b) > 0 {
		c := append([]byte(nil), b...)
		c[len(c)/2] ^= 0xff
		f.flipped = true
		return f.ResponseWriter.Write(c)
	}
	return f.ResponseWriter.Write(b)
}

// Index makes a multi-platform index of images keyed by "os/arch".
func Index(t testing.TB, imgs map[string]v1.Image) v1.ImageIndex {
	t.Helper()
	var adds []mutate.IndexAddendum
	for p, img := range imgs {
		pl, err := v1.ParsePlatform(p)
		if err != nil {
			t.Fatal(err)
		}
		adds = append(adds, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: pl}})
	}
	return mutate.AppendManifests(empty.Index, adds...)
}

// WriteLayout writes img into a new OCI image layout at dir, tagged tag
// (the org.opencontainers.image.ref.name annotation; "" for none).
func WriteLayout(t testing.TB, dir, tag string, img v1.Image) {
	t.Helper()
	p, err := layout.FromPath(dir)
	if err != nil {
		if p, err = layout.Write(dir, empty.Index); err != nil {
			t.Fatal(err)
		}
	}
	var opts []layout.Option
	if tag != "" {
		opts = append(opts, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": tag}))
	}
	if err := p.AppendImage(img, opts...); err != nil {
		t.Fatal(err)
	}
}

// WriteArchive writes img as a `docker save` tarball tagged tag.
func WriteArchive(t testing.TB, path, tag string, img v1.Image) {
	t.Helper()
	ref, err := name.NewTag(tag)
	if err != nil {
		t.Fatal(err)
	}
	if err := tarball.WriteToFile(path, ref, img); err != nil {
		t.Fatal(err)
	}
}

// Digest is img's manifest digest.
func Digest(t testing.TB, img v1.Image) string {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// LayerDigests lists img's layer digests.
func LayerDigests(t testing.TB, img v1.Image) []string {
	t.Helper()
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range ls {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, d.String())
	}
	return out
}

// Flattened describes what img holds once flattened, as go-containerregistry
// flattens it (mutate.Extract: an implementation independent of forkd's).
func Flattened(t testing.TB, img v1.Image) rootfstest.Tree {
	t.Helper()
	rc := mutate.Extract(img)
	defer rc.Close()
	tree, err := rootfstest.FromTar(rc)
	if err != nil {
		t.Fatalf("flatten: %v", err)
	}
	return tree
}
