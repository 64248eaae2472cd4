package dirrecord

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Attr is the extended attribute that holds a directory's record.
const Attr = "trusted.forkd.record"

// Version is the record format this build writes and reads. A record of
// another version is an error for Read, never guessed at.
const Version = 1

// maxSize bounds a record: one attribute value is at most 64 KiB on Linux.
const maxSize = 64 << 10

// ErrUnsupported is returned by Write when the directory's filesystem (or
// the caller's privileges) cannot keep a trusted extended attribute.
var ErrUnsupported = errors.New("the filesystem cannot keep trusted extended attributes")

// envelope is what the attribute holds: the format version, what kind of
// record it is, and the record itself.
type envelope struct {
	Version int             `json:"version"`
	Kind    string          `json:"kind"`
	Record  json.RawMessage `json:"record"`
}

// Write sets dir's record to v, of kind kind (e.g. "fork"), replacing any
// record dir had. It makes nothing durable itself: the caller's fsync of
// the directory, or of its parent after a rename on a filesystem with an
// ordered log, does.
func Write(dir, kind string, v any) error {
	rec, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("record %s: %w", dir, err)
	}
	b, err := json.Marshal(envelope{Version: Version, Kind: kind, Record: rec})
	if err != nil {
		return fmt.Errorf("record %s: %w", dir, err)
	}
	if len(b) > maxSize {
		return fmt.Errorf("record %s: %d bytes, over the %d an attribute holds", dir, len(b), maxSize)
	}
	fd, err := openDir(dir)
	if err != nil {
		return fmt.Errorf("record %s: %w", dir, err)
	}
	defer unix.Close(fd)
	if err := unix.Fsetxattr(fd, Attr, b, 0); err != nil {
		if errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EPERM) {
			return fmt.Errorf("record %s: %w: %w", dir, ErrUnsupported, err)
		}
		return fmt.Errorf("record %s: set %s: %w", dir, Attr, err)
	}
	return nil
}

// Read reads dir's record of kind into v. ok is false, with no error, when
// dir has no record; a record of another kind or version, or one that does
// not decode, is an error.
func Read(dir, kind string, v any) (ok bool, err error) {
	fd, err := openDir(dir)
	if err != nil {
		return false, fmt.Errorf("record %s: %w", dir, err)
	}
	defer unix.Close(fd)
	buf := make([]byte, maxSize)
	n, err := unix.Fgetxattr(fd, Attr, buf)
	switch {
	case errors.Is(err, unix.ENODATA), errors.Is(err, unix.ENOTSUP):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("record %s: get %s: %w", dir, Attr, err)
	}
	var e envelope
	if err := json.Unmarshal(buf[:n], &e); err != nil {
		return false, fmt.Errorf("record %s: %w", dir, err)
	}
	if e.Version != Version {
		return false, fmt.Errorf("record %s: format version %d, this forkd reads %d", dir, e.Version, Version)
	}
	if e.Kind != kind {
		return false, fmt.Errorf("record %s: a %q record, want %q", dir, e.Kind, kind)
	}
	if err := json.Unmarshal(e.Record, v); err != nil {
		return false, fmt.Errorf("record %s: %w", dir, err)
	}
	return true, nil
}

// ProbePrefix begins the name of Supported's probe directory; one a crash
// left behind may be removed by the directory's owner.
const ProbePrefix = ".dirrecord-probe-"

// Supported reports whether directories made under parent can keep a
// record: it writes and reads one on a probe directory it then removes.
func Supported(parent string) (bool, error) {
	dir, err := os.MkdirTemp(parent, ProbePrefix)
	if err != nil {
		return false, err
	}
	defer os.Remove(dir)
	if err := Write(dir, "probe", true); err != nil {
		if errors.Is(err, ErrUnsupported) {
			return false, nil
		}
		return false, err
	}
	var v bool
	ok, err := Read(dir, "probe", &v)
	return ok && v, err
}

// openDir opens dir itself, never what a symlink there points to.
func openDir(dir string) (int, error) {
	return unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
}
