package image

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Sentinel errors of resolving and building an image; the manager maps them
// to API errors.
var (
	ErrInvalidRef   = errors.New("invalid image reference")
	ErrNotFound     = errors.New("image not found")
	ErrUnreachable  = errors.New("registry unreachable")
	ErrUnauthorized = errors.New("registry refused the credentials")
	ErrPlatform     = errors.New("no image for the platform")
	ErrCorrupt      = errors.New("image content does not match its digest")
	ErrInUse        = errors.New("image in use")
)

// ociRefName is the OCI layout annotation that names an image (its tag).
const ociRefName = "org.opencontainers.image.ref.name"

// DefaultPlatform is the host's: a VM runs the host's architecture.
func DefaultPlatform() string { return "linux/" + runtime.GOARCH }

// ParsePlatform parses "os/arch[/variant]".
func ParsePlatform(s string) (v1.Platform, error) {
	p, err := v1.ParsePlatform(s)
	if err != nil || p.OS == "" || p.Architecture == "" || strings.Count(s, "/") > 2 {
		return v1.Platform{}, fmt.Errorf("%w: platform %q: want os/arch[/variant], e.g. linux/amd64", ErrInvalidRef, s)
	}
	return *p, nil
}

// source is a resolved image: the manifest for one platform, ready to read.
type source struct {
	img      v1.Image
	digest   string // the platform manifest's digest: the image's identity
	platform string
}

// resolve finds the image ref names for platform p: through the registry
// (credentials from the Docker config file via kc), an OCI layout or a
// docker-archive tarball. A multi-platform index yields its manifest for p;
// a single manifest must be for p.
func resolve(ctx context.Context, ref Ref, p v1.Platform, kc authn.Keychain, rt http.RoundTripper) (source, error) {
	var img v1.Image
	var err error
	switch ref.Transport {
	case TransportRegistry:
		img, err = resolveRemote(ctx, ref, p, kc, rt)
	case TransportOCI:
		img, err = resolveLayout(ref, p)
	case TransportDockerArchive:
		img, err = resolveArchive(ref)
	default:
		err = fmt.Errorf("%w: unknown transport %q", ErrInvalidRef, ref.Transport)
	}
	if err != nil {
		return source{}, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return source{}, fmt.Errorf("%s: read image config: %w", ref, classify(err))
	}
	got := v1.Platform{OS: cf.OS, Architecture: cf.Architecture, Variant: cf.Variant}
	if cf.OS != "" && !got.Satisfies(p) {
		return source{}, fmt.Errorf("%w: %s is for %s, not %s", ErrPlatform, ref, platformString(got), platformString(p))
	}
	d, err := img.Digest()
	if err != nil {
		return source{}, fmt.Errorf("%s: manifest digest: %w", ref, classify(err))
	}
	return source{img: img, digest: d.String(), platform: platformString(p)}, nil
}

func platformString(p v1.Platform) string {
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}

func resolveRemote(ctx context.Context, ref Ref, p v1.Platform, kc authn.Keychain, rt http.RoundTripper) (v1.Image, error) {
	opts := []remote.Option{remote.WithContext(ctx), remote.WithAuthFromKeychain(kc), remote.WithPlatform(p)}
	if rt != nil {
		opts = append(opts, remote.WithTransport(rt))
	}
	desc, err := remote.Get(ref.reg, opts...)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ref, classify(err))
	}
	if !desc.MediaType.IsIndex() {
		img, err := desc.Image()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", ref, classify(err))
		}
		return img, nil
	}
	idx, err := desc.ImageIndex()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ref, classify(err))
	}
	return fromIndex(ref, idx, p)
}

// fromIndex picks the manifest for p out of an index, saying which
// platforms it has when none fits.
func fromIndex(ref Ref, idx v1.ImageIndex, p v1.Platform) (v1.Image, error) {
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("%s: read index: %w", ref, classify(err))
	}
	var have []string
	for _, m := range im.Manifests {
		if m.Platform == nil || !m.MediaType.IsImage() {
			continue
		}
		if m.Platform.Satisfies(p) {
			img, err := idx.Image(m.Digest)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", ref, classify(err))
			}
			return img, nil
		}
		if m.Platform.OS != "unknown" {
			have = append(have, platformString(*m.Platform))
		}
	}
	return nil, fmt.Errorf("%w: %s has no image for %s (it has: %s)", ErrPlatform, ref, platformString(p), strings.Join(have, ", "))
}

func resolveLayout(ref Ref, p v1.Platform) (v1.Image, error) {
	if _, err := os.Stat(ref.Path); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrNotFound, ref, err)
	}
	l, err := layout.FromPath(ref.Path)
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not an OCI image layout: %v", ErrInvalidRef, ref, err)
	}
	idx, err := l.ImageIndex()
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not an OCI image layout: %v", ErrInvalidRef, ref, err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("%w: %s: read index.json: %v", ErrInvalidRef, ref, err)
	}
	var pick []v1.Descriptor
	var tags []string
	for _, m := range im.Manifests {
		tag := m.Annotations[ociRefName]
		if tag != "" {
			tags = append(tags, tag)
		}
		if ref.Tag == "" || tag == ref.Tag {
			pick = append(pick, m)
		}
	}
	switch {
	case len(pick) == 0 && ref.Tag != "":
		return nil, fmt.Errorf("%w: %s: the layout has no image tagged %q (it has: %s)", ErrNotFound, ref, ref.Tag, strings.Join(tags, ", "))
	case len(pick) == 0:
		return nil, fmt.Errorf("%w: %s: the layout holds no image", ErrNotFound, ref)
	case len(pick) > 1:
		return nil, fmt.Errorf("%w: %s holds %d images: name one as oci:PATH:TAG (tags: %s)", ErrInvalidRef, ref, len(pick), strings.Join(tags, ", "))
	}
	d := pick[0]
	if d.MediaType.IsIndex() {
		sub, err := idx.ImageIndex(d.Digest)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", ref, classify(err))
		}
		return fromIndex(ref, sub, p)
	}
	img, err := idx.Image(d.Digest)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ref, classify(err))
	}
	return img, nil
}

func resolveArchive(ref Ref) (v1.Image, error) {
	if _, err := os.Stat(ref.Path); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrNotFound, ref, err)
	}
	img, err := tarball.ImageFromPath(ref.Path, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not a single-image docker save tarball: %v", ErrInvalidRef, ref, err)
	}
	return img, nil
}

// classify wraps a go-containerregistry error in the sentinel it stands
// for, keeping its text.
func classify(err error) error {
	if err == nil {
		return nil
	}
	var te *transport.Error
	if errors.As(err, &te) {
		switch {
		case te.StatusCode == http.StatusUnauthorized || te.StatusCode == http.StatusForbidden:
			return fmt.Errorf("%w (set credentials with docker login, in the Docker config file of the daemon's user): %v", ErrUnauthorized, err)
		case te.StatusCode == http.StatusNotFound:
			return fmt.Errorf("%w: %v", ErrNotFound, err)
		}
		for _, d := range te.Errors {
			switch d.Code {
			case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
				return fmt.Errorf("%w: %v", ErrNotFound, err)
			case transport.UnauthorizedErrorCode, transport.DeniedErrorCode:
				return fmt.Errorf("%w: %v", ErrUnauthorized, err)
			}
		}
		return fmt.Errorf("%w: %v", ErrUnreachable, err)
	}
	var ne net.Error
	var oe *net.OpError
	var dnse *net.DNSError
	if errors.As(err, &oe) || errors.As(err, &dnse) || errors.As(err, &ne) {
		return fmt.Errorf("%w: %v", ErrUnreachable, err)
	}
	if strings.Contains(err.Error(), "error verifying") {
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return err
}
