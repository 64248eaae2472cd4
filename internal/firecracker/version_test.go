package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestParseVersion(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Version
		bad  bool
	}{
		{in: "1.12.1", want: Version{1, 12, 1}},
		{in: "v1.10.0", want: Version{1, 10, 0}},
		{in: "1.16", want: Version{1, 16, 0}},
		{in: "1.14.0-dev", want: Version{1, 14, 0}},
		{in: "1.16.1-forkd+0.1.0", want: Version{1, 16, 1}},
		{in: "", bad: true},
		{in: "1", bad: true},
		{in: "1.x.0", bad: true},
		{in: "1.2.3.4", bad: true},
		{in: "1.-2.0", bad: true},
		{in: "01.2.0", bad: true},
	} {
		got, err := ParseVersion(tc.in)
		if tc.bad {
			if err == nil {
				t.Errorf("ParseVersion(%q) = %v, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseVersion(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
		}
	}
}

func TestCheckSupportedRefusesOldAndForeignMajorVersions(t *testing.T) {
	for _, v := range TestedVersions() {
		if err := CheckSupported(v); err != nil {
			t.Errorf("tested version %s refused: %v", v, err)
		}
	}
	if err := CheckSupported(Version{1, 17, 0}); err != nil {
		t.Errorf("a newer 1.x release is refused: %v", err)
	}
	for _, v := range []Version{{1, 9, 1}, {0, 25, 0}, {2, 0, 0}} {
		err := CheckSupported(v)
		if !errors.Is(err, ErrUnsupportedVersion) || !strings.Contains(err.Error(), v.String()) {
			t.Errorf("CheckSupported(%s) = %v, want ErrUnsupportedVersion naming the version", v, err)
		}
	}
	if TestedVersions()[0].Compare(MinVersion()) < 0 {
		t.Errorf("the oldest tested version %s is below MinVersion %s", TestedVersions()[0], MinVersion())
	}
}

func TestFeaturesFollowReleases(t *testing.T) {
	for _, tc := range []struct {
		f       Feature
		have    []Version
		haveNot []Version
	}{
		{FeatureLoadTrackDirtyPages, []Version{{1, 13, 0}, {1, 16, 1}}, []Version{{1, 10, 1}, {1, 12, 1}}},
		{FeatureNetworkOverrides, []Version{{1, 12, 0}, {1, 16, 1}}, []Version{{1, 10, 1}, {1, 11, 0}}},
		{FeatureVsockOverride, []Version{{1, 16, 0}, {1, 17, 0}}, []Version{{1, 15, 1}, {1, 10, 0}}},
		{FeatureNetworkMTU, []Version{{1, 16, 0}}, []Version{{1, 15, 1}}},
		// Backported to patch releases: 1.14.4 and 1.15.1 have it, 1.15.0 not.
		{FeatureClockRealtime, []Version{{1, 14, 4}, {1, 15, 1}, {1, 16, 0}}, []Version{{1, 14, 3}, {1, 15, 0}, {1, 13, 2}}},
		{FeatureDiffWithoutDirtyTracking, []Version{{1, 13, 0}}, []Version{{1, 12, 1}}},
		{FeatureUffdPageSize, []Version{{1, 12, 0}}, []Version{{1, 11, 0}}},
		{FeatureUffdSocketKeptOpen, []Version{{1, 12, 0}}, []Version{{1, 11, 0}}},
	} {
		for _, v := range tc.have {
			if !v.Supports(tc.f) {
				t.Errorf("%s.Supports(%d) = false, want true", v, tc.f)
			}
		}
		for _, v := range tc.haveNot {
			if v.Supports(tc.f) {
				t.Errorf("%s.Supports(%d) = true, want false", v, tc.f)
			}
		}
	}
}

// loadJSON is the /snapshot/load body the client sends to version v.
func loadJSON(t *testing.T, v Version, s SnapshotLoad) (map[string]any, error) {
	t.Helper()
	w, err := s.loadBody(v)
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(w)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m, nil
}

func TestLoadSnapshotNamesDirtyTrackingByVersion(t *testing.T) {
	s := SnapshotLoad{SnapshotPath: "/s", MemBackend: MemBackend{BackendFile, "/m"}, TrackDirtyPages: true}
	for _, v := range TestedVersions() {
		m, err := loadJSON(t, v, s)
		if err != nil {
			t.Fatalf("%s: %v", v, err)
		}
		want, other := "track_dirty_pages", "enable_diff_snapshots"
		if v.Compare(Version{1, 13, 0}) < 0 {
			want, other = other, want
		}
		if m[want] != true {
			t.Errorf("%s: body %v lacks %s: true", v, m, want)
		}
		if _, ok := m[other]; ok {
			t.Errorf("%s: body %v carries %s, which this release refuses", v, m, other)
		}
		if _, ok := m["mem_file_path"]; ok || m["mem_backend"] == nil {
			t.Errorf("%s: body %v: want mem_backend, never the deprecated mem_file_path", v, m)
		}
	}
}

func TestLoadSnapshotRefusesOverridesTheVersionLacks(t *testing.T) {
	s := SnapshotLoad{SnapshotPath: "/s", MemBackend: MemBackend{BackendFile, "/m"},
		NetworkOverrides: []NetworkOverride{{IfaceID: "eth0", HostDevName: "tap9"}}}
	if _, err := loadJSON(t, Version{1, 11, 0}, s); !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "network_overrides") {
		t.Errorf("network_overrides to 1.11: err %v, want ErrNotSupported naming the field", err)
	}
	m, err := loadJSON(t, Version{1, 12, 1}, s)
	if err != nil || m["network_overrides"] == nil {
		t.Errorf("network_overrides to 1.12.1: %v %v", m, err)
	}
	s.VsockOverride = &VsockOverride{UDSPath: "v.sock"}
	if _, err := loadJSON(t, Version{1, 15, 1}, s); !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "vsock_override") {
		t.Errorf("vsock_override to 1.15.1: err %v, want ErrNotSupported naming the field", err)
	}
	if m, err := loadJSON(t, Version{1, 16, 1}, s); err != nil || m["vsock_override"] == nil {
		t.Errorf("vsock_override to 1.16.1: %v %v", m, err)
	}
}

// A client that does not know the version asks GET /version once, before
// the first request whose fields depend on it, and remembers it.
func TestClientLearnsTheVersionOnce(t *testing.T) {
	f := startFakeVMM(t, 200, `{"firecracker_version":"1.12.1"}`)
	c := NewClient(f.sock)
	defer c.Close()
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		v, err := c.Version(ctx)
		if err != nil || v != (Version{1, 12, 1}) {
			t.Fatalf("Version = %v, %v; want 1.12.1", v, err)
		}
	}
	if r := <-f.reqs; r.method != "GET" || r.path != "/version" {
		t.Fatalf("first request %s %s, want GET /version", r.method, r.path)
	}
	select {
	case r := <-f.reqs:
		t.Fatalf("a second request %s %s: the version was not remembered", r.method, r.path)
	default:
	}
}
