package image

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
)

// Transports: where an image comes from, named as skopeo names them.
const (
	TransportRegistry      = "docker"         // a registry reference: alpine:3.20, ghcr.io/o/r@sha256:…
	TransportOCI           = "oci"            // oci:PATH[:TAG], an OCI image layout directory
	TransportDockerArchive = "docker-archive" // docker-archive:PATH, a `docker save` tarball
)

// Ref is a parsed image reference.
type Ref struct {
	Transport string
	Path      string         // oci, docker-archive: absolute path on the host
	Tag       string         // oci: the layout's ref.name annotation ("" for its only image)
	reg       name.Reference // registry
}

// ParseRef parses a reference: "oci:PATH[:TAG]", "docker-archive:PATH", or
// anything else as a registry reference (Docker Hub by default). As in
// skopeo, an oci reference's tag is what follows its last ':' when that
// part holds no '/'. Paths must be absolute: the daemon does not share the
// client's working directory (the CLI makes them absolute).
func ParseRef(s string) (Ref, error) {
	if s == "" {
		return Ref{}, fmt.Errorf("%w: empty image reference", ErrInvalidRef)
	}
	if rest, ok := strings.CutPrefix(s, TransportOCI+":"); ok {
		p, tag := rest, ""
		if i := strings.LastIndex(rest, ":"); i >= 0 && !strings.Contains(rest[i+1:], "/") {
			p, tag = rest[:i], rest[i+1:]
		}
		if err := checkPath(s, p); err != nil {
			return Ref{}, err
		}
		return Ref{Transport: TransportOCI, Path: filepath.Clean(p), Tag: tag}, nil
	}
	if p, ok := strings.CutPrefix(s, TransportDockerArchive+":"); ok {
		if err := checkPath(s, p); err != nil {
			return Ref{}, err
		}
		return Ref{Transport: TransportDockerArchive, Path: filepath.Clean(p)}, nil
	}
	if t, _, ok := strings.Cut(s, ":"); ok && isTransportName(t) {
		return Ref{}, fmt.Errorf("%w: %q: transport %q is not supported (use a registry reference, oci:PATH[:TAG] or docker-archive:PATH)", ErrInvalidRef, s, t)
	}
	r, err := name.ParseReference(strings.TrimPrefix(s, "docker://"))
	if err != nil {
		return Ref{}, fmt.Errorf("%w: %q: %v", ErrInvalidRef, s, err)
	}
	return Ref{Transport: TransportRegistry, reg: r}, nil
}

// isTransportName reports whether t is one of skopeo's other transports,
// so "dir:/x" is refused by name rather than parsed as host "dir".
func isTransportName(t string) bool {
	switch t {
	case "dir", "docker-daemon", "oci-archive", "containers-storage", "sif", "ostree":
		return true
	}
	return false
}

func checkPath(ref, p string) error {
	if p == "" || !filepath.IsAbs(p) {
		return fmt.Errorf("%w: %q: the path must be absolute", ErrInvalidRef, ref)
	}
	return nil
}

// String is the canonical form stored as the image's tag: registry
// references fully qualified (index.docker.io/library/alpine:latest),
// paths cleaned.
func (r Ref) String() string {
	switch r.Transport {
	case TransportOCI:
		if r.Tag != "" {
			return TransportOCI + ":" + r.Path + ":" + r.Tag
		}
		return TransportOCI + ":" + r.Path
	case TransportDockerArchive:
		return TransportDockerArchive + ":" + r.Path
	default:
		if r.reg == nil {
			return ""
		}
		return r.reg.Name()
	}
}

// Canonical returns the canonical form of a reference string, or s itself
// when it does not parse.
func Canonical(s string) string {
	r, err := ParseRef(s)
	if err != nil {
		return s
	}
	return r.String()
}
