package emulator

import (
	"fmt"
	"strconv"
	"strings"
)

// release is the Firecracker release the emulator stands for
// (--firecracker-version). It decides which request fields exist (see
// schema.go), the snapshot data version written into and required of a
// vmstate, and the few behaviours that changed between releases.
//
// These facts are the emulator's own transcription of Firecracker's
// request structs, swagger and CHANGELOG at each tag. They are kept apart
// from the driver's feature table (internal/firecracker) on purpose: the
// tests that drive one against the other would prove nothing if both read
// the same list.
type release struct{ major, minor, patch int }

func (r release) String() string { return fmt.Sprintf("%d.%d.%d", r.major, r.minor, r.patch) }

func (r release) atLeast(major, minor, patch int) bool {
	switch {
	case r.major != major:
		return r.major > major
	case r.minor != minor:
		return r.minor > minor
	}
	return r.patch >= patch
}

// releaseLine is one supported minor release: its newest patch and the
// snapshot data version (Firecracker's SNAPSHOT_VERSION) it writes.
type releaseLine struct {
	newest   release
	snapshot snapshotVersion
}

// releaseLines are the supported Firecracker releases, oldest first.
func releaseLines() []releaseLine {
	return []releaseLine{
		{release{1, 10, 1}, snapshotVersion{4, 0, 0}},
		{release{1, 11, 0}, snapshotVersion{5, 0, 0}},
		{release{1, 12, 1}, snapshotVersion{6, 0, 0}},
		{release{1, 13, 2}, snapshotVersion{8, 0, 0}},
		{release{1, 14, 4}, snapshotVersion{8, 0, 0}},
		{release{1, 15, 1}, snapshotVersion{9, 0, 0}},
		{release{1, 16, 1}, snapshotVersion{10, 0, 0}},
	}
}

// SupportedVersions lists the values --firecracker-version accepts as
// MAJOR.MINOR, oldest first (MAJOR.MINOR.PATCH of a released patch of one
// of them is accepted too).
func SupportedVersions() []string {
	var out []string
	for _, l := range releaseLines() {
		out = append(out, fmt.Sprintf("%d.%d", l.newest.major, l.newest.minor))
	}
	return out
}

// DefaultFirecrackerVersion is the newest supported release.
func DefaultFirecrackerVersion() string {
	v := SupportedVersions()
	return v[len(v)-1]
}

// ParseFirecrackerVersion checks a --firecracker-version value: "1.12"
// stands for that line's newest patch, "1.12.0" for that patch (which must
// have been released).
func ParseFirecrackerVersion(s string) error {
	_, _, err := lookupRelease(s)
	return err
}

func lookupRelease(s string) (release, snapshotVersion, error) {
	bad := func() (release, snapshotVersion, error) {
		return release{}, snapshotVersion{}, fmt.Errorf("firecracker version %q is not supported; want one of %s (MAJOR.MINOR, or MAJOR.MINOR.PATCH of a released patch)",
			s, strings.Join(SupportedVersions(), ", "))
	}
	parts := strings.Split(strings.TrimPrefix(strings.TrimSpace(s), "v"), ".")
	if len(parts) < 2 || len(parts) > 3 {
		return bad()
	}
	var n [3]int
	for i, p := range parts {
		v, err := strconv.Atoi(p)
		if err != nil || v < 0 {
			return bad()
		}
		n[i] = v
	}
	for _, l := range releaseLines() {
		if l.newest.major != n[0] || l.newest.minor != n[1] {
			continue
		}
		if len(parts) == 2 {
			return l.newest, l.snapshot, nil
		}
		if n[2] > l.newest.patch {
			return bad()
		}
		return release{n[0], n[1], n[2]}, l.snapshot, nil
	}
	return bad()
}

// snapshotVersion is Firecracker's snapshot data version (semver). A
// release loads a snapshot only of its own major version and a minor no
// newer than its own: a snapshot written by a newer release, or by one with
// another data format, is refused.
type snapshotVersion struct{ Major, Minor, Patch int }

func (v snapshotVersion) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch) }

// loads reports whether a release writing version v can load a snapshot of
// version s (Firecracker's rule in its snapshot loader).
func (v snapshotVersion) loads(s snapshotVersion) bool {
	return s.Major == v.Major && s.Minor <= v.Minor
}

// Behaviours that changed between releases (CHANGELOG).

// diffWithoutTracking: 1.13 takes Diff snapshots without dirty tracking
// (mincore over-approximates); older releases refuse them.
func (r release) diffWithoutTracking() bool { return r.atLeast(1, 13, 0) }

// uffdPageSize: the Uffd handshake carries page_size from 1.12 (before,
// only page_size_kib, which holds bytes).
func (r release) uffdPageSize() bool { return r.atLeast(1, 12, 0) }

// uffdKeepsSocket: from 1.12 the VMM keeps the handshake socket open for
// its life; before, it closed it right after sending.
func (r release) uffdKeepsSocket() bool { return r.atLeast(1, 12, 0) }

// uffdAlwaysEventRemove: from 1.12 the uffd always has
// UFFD_FEATURE_EVENT_REMOVE; before, only when a balloon device exists.
func (r release) uffdAlwaysEventRemove() bool { return r.atLeast(1, 12, 0) }

// hugePagesRefuseBalloon: before 1.14 huge_pages 2M and a balloon device
// exclude each other (either order); from 1.14 both may be configured.
func (r release) hugePagesRefuseBalloon() bool { return !r.atLeast(1, 14, 0) }

// hugePagesRefuseInitrd: 1.10 refuses huge_pages 2M beside an initrd
// (either order); 1.11 dropped that restriction.
func (r release) hugePagesRefuseInitrd() bool { return !r.atLeast(1, 11, 0) }
