package firecracker

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Version is a Firecracker release number. Firecracker's API changes only
// between releases, and each request decodes with serde's
// deny_unknown_fields, so a field one version lacks makes the whole request
// fail: every request this package builds picks its fields by Version.
type Version struct {
	Major, Minor, Patch int
}

// MinVersion is the oldest Firecracker forkd drives. Older releases lack the
// snapshot API forkd relies on (mem_backend with Uffd and dirty tracking as
// forkd uses them are tested from here on) and are refused at launch.
func MinVersion() Version { return Version{1, 10, 0} }

// TestedVersions are the Firecracker releases forkd is tested against (the
// newest patch of each minor release from MinVersion on), oldest first. A
// newer 1.x release is driven like the newest of these.
func TestedVersions() []Version {
	return []Version{{1, 10, 1}, {1, 11, 0}, {1, 12, 1}, {1, 13, 2}, {1, 14, 4}, {1, 15, 1}, {1, 16, 1}}
}

// ErrUnsupportedVersion is wrapped by a launch or adoption of a VMM whose
// version forkd cannot drive.
var ErrUnsupportedVersion = errors.New("unsupported Firecracker version")

// ParseVersion reads "1.12.1", "v1.12.1" or "1.12" (patch 0). A pre-release
// or build suffix ("1.14.0-dev", "1.16.1-forkd+0.3") is ignored: a
// development build speaks the API of the release it leads to.
func ParseVersion(s string) (Version, error) {
	t := strings.TrimPrefix(strings.TrimSpace(s), "v")
	if i := strings.IndexAny(t, "-+"); i >= 0 {
		t = t[:i]
	}
	parts := strings.Split(t, ".")
	if len(parts) < 2 || len(parts) > 3 {
		return Version{}, fmt.Errorf("firecracker version %q: want MAJOR.MINOR[.PATCH]", s)
	}
	var n [3]int
	for i, p := range parts {
		v, err := strconv.Atoi(p)
		if err != nil || v < 0 || p == "" || (len(p) > 1 && p[0] == '0') {
			return Version{}, fmt.Errorf("firecracker version %q: %q is not a number", s, p)
		}
		n[i] = v
	}
	return Version{n[0], n[1], n[2]}, nil
}

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch) }

// IsZero reports an unknown version.
func (v Version) IsZero() bool { return v == Version{} }

// Compare returns -1, 0 or +1 as v is older than, equal to or newer than o.
func (v Version) Compare(o Version) int {
	for _, d := range [3]int{v.Major - o.Major, v.Minor - o.Minor, v.Patch - o.Patch} {
		if d < 0 {
			return -1
		}
		if d > 0 {
			return 1
		}
	}
	return 0
}

// AtLeast reports v >= o.
func (v Version) AtLeast(o Version) bool { return v.Compare(o) >= 0 }

// CheckSupported refuses a version forkd cannot drive: older than
// MinVersion, or of another major version (Firecracker 2.0 may remove the
// deprecated fields and handshake keys 1.x still accepts).
func CheckSupported(v Version) error {
	newest := TestedVersions()[len(TestedVersions())-1]
	if !v.AtLeast(MinVersion()) {
		return fmt.Errorf("%w: Firecracker %s is older than %s, the oldest version forkd drives; install Firecracker %d.%d to %d.%d",
			ErrUnsupportedVersion, v, MinVersion(), MinVersion().Major, MinVersion().Minor, newest.Major, newest.Minor)
	}
	if v.Major != MinVersion().Major {
		return fmt.Errorf("%w: Firecracker %s is a new major version forkd has not been taught; install Firecracker %d.%d to %d.%d",
			ErrUnsupportedVersion, v, MinVersion().Major, MinVersion().Minor, newest.Major, newest.Minor)
	}
	return nil
}

// Feature is a request field (or a VMM behaviour forkd depends on) that
// only some Firecracker releases have. Callers that may send an optional
// field ask Supports first; the client refuses to send a field the VMM's
// version lacks rather than have the VMM refuse the whole request.
type Feature int

const (
	// FeatureLoadTrackDirtyPages: PUT /snapshot/load `track_dirty_pages` (1.13).
	// Older releases call it `enable_diff_snapshots` (deprecated from 1.13).
	FeatureLoadTrackDirtyPages Feature = iota
	// FeatureNetworkOverrides: PUT /snapshot/load `network_overrides` (1.12), which
	// renames a restored interface's TAP device.
	FeatureNetworkOverrides
	// FeatureVsockOverride: PUT /snapshot/load `vsock_override` (1.16), which
	// rebinds a restored vsock device's Unix socket elsewhere.
	FeatureVsockOverride
	// FeatureNetworkMTU: PUT /network-interfaces `mtu` (1.16).
	FeatureNetworkMTU
	// FeatureClockRealtime: PUT /snapshot/load `clock_realtime` (1.16, backported
	// to 1.14.4 and 1.15.1).
	FeatureClockRealtime
	// FeatureDiffWithoutDirtyTracking: a Diff snapshot of a VM booted or loaded
	// without dirty tracking (1.13, from mincore(2)); older releases refuse it.
	FeatureDiffWithoutDirtyTracking
	// FeatureUffdPageSize: the Uffd handshake carries `page_size` (1.12); older
	// releases send only `page_size_kib` (which holds bytes).
	FeatureUffdPageSize
	// FeatureUffdSocketKeptOpen: the VMM keeps the Uffd handshake socket open for
	// its life (1.12), so its EOF means the VMM exited. Older releases close
	// it right after the handshake.
	FeatureUffdSocketKeptOpen
)

// featureSince lists, per feature, the first release of each minor line
// that has it; every release from the last entry on has it too. One entry
// is a plain "since"; more record backports to patch releases.
func featureSince(f Feature) (name string, since []Version) {
	switch f {
	case FeatureLoadTrackDirtyPages:
		return "PUT /snapshot/load track_dirty_pages", []Version{{1, 13, 0}}
	case FeatureNetworkOverrides:
		return "PUT /snapshot/load network_overrides", []Version{{1, 12, 0}}
	case FeatureVsockOverride:
		return "PUT /snapshot/load vsock_override", []Version{{1, 16, 0}}
	case FeatureNetworkMTU:
		return "PUT /network-interfaces mtu", []Version{{1, 16, 0}}
	case FeatureClockRealtime:
		return "PUT /snapshot/load clock_realtime", []Version{{1, 14, 4}, {1, 15, 1}, {1, 16, 0}}
	case FeatureDiffWithoutDirtyTracking:
		return "Diff snapshots without dirty page tracking", []Version{{1, 13, 0}}
	case FeatureUffdPageSize:
		return "page_size in the Uffd handshake", []Version{{1, 12, 0}}
	case FeatureUffdSocketKeptOpen:
		return "a Uffd handshake socket kept open", []Version{{1, 12, 0}}
	}
	return fmt.Sprintf("feature %d", int(f)), nil
}

// Supports reports whether release v has feature f.
func (v Version) Supports(f Feature) bool {
	_, since := featureSince(f)
	if len(since) == 0 {
		return false
	}
	for _, s := range since[:len(since)-1] {
		if v.Major == s.Major && v.Minor == s.Minor {
			return v.Patch >= s.Patch
		}
	}
	return v.AtLeast(since[len(since)-1])
}

// requireFeature is the error for a request that needs f on a VMM without it.
func requireFeature(v Version, f Feature) error {
	if v.Supports(f) {
		return nil
	}
	name, since := featureSince(f)
	return fmt.Errorf("%w: %s needs Firecracker %s or newer; this VMM is %s", ErrNotSupported, name, since[0], v)
}
