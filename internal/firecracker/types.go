package firecracker

// Snapshot types of PUT /snapshot/create.
const (
	SnapshotFull = "Full"
	SnapshotDiff = "Diff"
)

// Memory backends of PUT /snapshot/load.
const (
	BackendFile = "File"
	BackendUffd = "Uffd"
)

// VM states of PATCH /vm and of InstanceInfo.State.
const (
	StateNotStarted = "Not started"
	StateRunning    = "Running"
	StatePaused     = "Paused"
)

// MachineConfig is the body of PUT /machine-config.
type MachineConfig struct {
	VcpuCount  int  `json:"vcpu_count"`
	MemSizeMib int  `json:"mem_size_mib"`
	Smt        bool `json:"smt,omitempty"`
	// TrackDirtyPages enables KVM dirty logging, which Diff snapshots need.
	TrackDirtyPages bool `json:"track_dirty_pages"`
	// HugePages is "None" (Firecracker's default when left out) or "2M":
	// guest memory from the host's hugetlbfs pool.
	HugePages string `json:"huge_pages,omitempty"`
}

// HugePages2M is MachineConfig.HugePages for 2 MiB hugetlbfs pages.
const HugePages2M = "2M"

// BootSource is the body of PUT /boot-source.
type BootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	BootArgs        string `json:"boot_args,omitempty"`
	InitrdPath      string `json:"initrd_path,omitempty"`
}

// Drive is the body of PUT /drives/{drive_id}.
type Drive struct {
	DriveID      string `json:"drive_id"`
	PathOnHost   string `json:"path_on_host"`
	IsRootDevice bool   `json:"is_root_device"`
	IsReadOnly   bool   `json:"is_read_only"`
}

// NetworkInterface is the body of PUT /network-interfaces/{iface_id}.
type NetworkInterface struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
	GuestMAC    string `json:"guest_mac,omitempty"`
	// MTU is advertised to the guest (1.16+; 0 = not sent).
	MTU int `json:"mtu,omitempty"`
}

// Vsock is the body of PUT /vsock (before boot). Firecracker binds UDSPath
// (relative to its working directory) when the device is made, and again
// on every load of a snapshot of the VM; it leaves the socket file behind
// when it exits.
type Vsock struct {
	GuestCID uint32 `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

// SnapshotCreate is the body of PUT /snapshot/create. The VM must be Paused.
type SnapshotCreate struct {
	SnapshotType string `json:"snapshot_type,omitempty"` // SnapshotFull (default) | SnapshotDiff
	SnapshotPath string `json:"snapshot_path"`
	MemFilePath  string `json:"mem_file_path"`
}

// MemBackend says where a loaded snapshot's guest memory comes from: a
// mem-file mapped MAP_PRIVATE (File) or a userfaultfd handler listening on a
// Unix socket (Uffd).
type MemBackend struct {
	BackendType string `json:"backend_type"` // BackendFile | BackendUffd
	BackendPath string `json:"backend_path"`
}

// SnapshotLoad is PUT /snapshot/load. It is accepted only by a fresh VMM
// process; a failed load leaves the process unusable. The client encodes it
// for the VMM's version (see loadBody): fields are named as of the newest
// release here.
type SnapshotLoad struct {
	SnapshotPath string
	MemBackend   MemBackend
	// TrackDirtyPages is not persisted in the snapshot: send it on every load
	// that should be able to take a Diff snapshot later. Sent as
	// `track_dirty_pages` from 1.13, `enable_diff_snapshots` before.
	TrackDirtyPages bool
	ResumeVM        bool
	// FeatureNetworkOverrides rename restored interfaces' TAP devices (1.12+).
	NetworkOverrides []NetworkOverride
	// FeatureVsockOverride rebinds the restored vsock device elsewhere (1.16+).
	VsockOverride *VsockOverride
}

// NetworkOverride is one entry of SnapshotLoad.NetworkOverrides.
type NetworkOverride struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
}

// VsockOverride is SnapshotLoad.VsockOverride.
type VsockOverride struct {
	UDSPath string `json:"uds_path"`
}

// loadWire is the JSON of PUT /snapshot/load: every field any supported
// version knows, each left out unless loadBody sets it.
type loadWire struct {
	SnapshotPath        string            `json:"snapshot_path"`
	MemBackend          *MemBackend       `json:"mem_backend,omitempty"`
	EnableDiffSnapshots *bool             `json:"enable_diff_snapshots,omitempty"`
	TrackDirtyPages     *bool             `json:"track_dirty_pages,omitempty"`
	ResumeVM            bool              `json:"resume_vm"`
	NetworkOverrides    []NetworkOverride `json:"network_overrides,omitempty"`
	VsockOverride       *VsockOverride    `json:"vsock_override,omitempty"`
}

// loadBody encodes s for Firecracker v. Every supported version takes
// mem_backend (mem_file_path is its deprecated File-only form, never sent).
// Dirty tracking is track_dirty_pages from 1.13 and enable_diff_snapshots
// before it: each version refuses the other's name. Overrides the version
// lacks are an error, never silently dropped: a restore that ignored a TAP
// rename would open another VM's device.
func (s SnapshotLoad) loadBody(v Version) (loadWire, error) {
	w := loadWire{SnapshotPath: s.SnapshotPath, ResumeVM: s.ResumeVM}
	mb := s.MemBackend
	w.MemBackend = &mb
	track := s.TrackDirtyPages
	if v.Supports(FeatureLoadTrackDirtyPages) {
		w.TrackDirtyPages = &track
	} else {
		w.EnableDiffSnapshots = &track
	}
	if len(s.NetworkOverrides) > 0 {
		if err := requireFeature(v, FeatureNetworkOverrides); err != nil {
			return w, err
		}
		w.NetworkOverrides = s.NetworkOverrides
	}
	if s.VsockOverride != nil {
		if err := requireFeature(v, FeatureVsockOverride); err != nil {
			return w, err
		}
		w.VsockOverride = s.VsockOverride
	}
	return w, nil
}

// VersionInfo is the body of GET /version.
type VersionInfo struct {
	FirecrackerVersion string `json:"firecracker_version"`
}

// InstanceInfo is the body of GET /.
type InstanceInfo struct {
	AppName    string `json:"app_name"`
	ID         string `json:"id"`
	State      string `json:"state"` // StateNotStarted | StateRunning | StatePaused
	VMMVersion string `json:"vmm_version"`
}

// GuestStatus is the body of GET /guest, which only the emulator serves: the
// state of its self-verifying guest workload.
type GuestStatus struct {
	Ticks               uint64 `json:"ticks"`
	PagesRead           uint64 `json:"pages_read"`
	PagesWritten        uint64 `json:"pages_written"`
	PagesVerified       uint64 `json:"pages_verified"`
	IntegrityErrors     uint64 `json:"integrity_errors"`
	FirstIntegrityError string `json:"first_integrity_error"`
	// BootID is random per guest boot and kept in guest memory: a fork
	// reports its source's ("" from an emulator that predates it).
	BootID string `json:"boot_id"`
}
