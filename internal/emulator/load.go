package emulator

import (
	"fmt"
	"os"
)

type memBackend struct {
	BackendType *string `json:"backend_type"`
	BackendPath *string `json:"backend_path"`
}

type snapshotLoad struct {
	SnapshotPath        *string     `json:"snapshot_path"`
	MemBackend          *memBackend `json:"mem_backend"`
	MemFilePath         *string     `json:"mem_file_path"`         // deprecated form of mem_backend File
	EnableDiffSnapshots bool        `json:"enable_diff_snapshots"` // deprecated from 1.13
	TrackDirtyPages     bool        `json:"track_dirty_pages"`     // 1.13+
	ResumeVM            bool        `json:"resume_vm"`
	NetworkOverrides    []struct {
		IfaceID     string `json:"iface_id"`
		HostDevName string `json:"host_dev_name"`
	} `json:"network_overrides"` // 1.12+
	VsockOverride *struct {
		UDSPath string `json:"uds_path"`
	} `json:"vsock_override"` // 1.16+
	ClockRealtime bool `json:"clock_realtime"` // 1.14.4, 1.15.1, 1.16+; no clock to advance here
}

// loadParams is a validated load request.
type loadParams struct {
	vmstate, backendType, backendPath string
	track, resume                     bool
}

// validate applies Firecracker's checks of the parsed request (which fields
// exist at all is the release's schema's business, already checked).
func (r snapshotLoad) validate() (loadParams, error) {
	var p loadParams
	if r.SnapshotPath == nil {
		return p, deserializeError{"missing field `snapshot_path`"}
	}
	p.vmstate, p.resume = *r.SnapshotPath, r.ResumeVM
	switch {
	case r.MemBackend != nil && r.MemFilePath != nil:
		return p, deserializeError{"too many fields: either `mem_backend` or `mem_file_path` exclusively is required"}
	case r.MemFilePath != nil:
		p.backendType, p.backendPath = "File", *r.MemFilePath
	case r.MemBackend != nil:
		if r.MemBackend.BackendType == nil || r.MemBackend.BackendPath == nil {
			return p, deserializeError{"missing field `backend_type` or `backend_path`"}
		}
		p.backendType, p.backendPath = *r.MemBackend.BackendType, *r.MemBackend.BackendPath
		if p.backendType != "File" && p.backendType != "Uffd" {
			return p, deserializeError{fmt.Sprintf("unknown variant `%s`, expected `File` or `Uffd`", p.backendType)}
		}
	default:
		return p, deserializeError{"missing field: either `mem_backend` or `mem_file_path` is required"}
	}
	// From 1.13 either name turns tracking on (the deprecated one too);
	// before 1.13 track_dirty_pages does not exist (refused by the schema).
	p.track = r.EnableDiffSnapshots || r.TrackDirtyPages
	return p, nil
}

// loadSnapshot is PUT /snapshot/load. It is allowed only on a fresh
// process; once it starts, any failure leaves the process unusable, as in
// Firecracker (the caller must start a new VMM).
func (v *vmm) loadSnapshot(req snapshotLoad) error {
	p, err := req.validate()
	if err != nil {
		return err
	}
	for _, c := range [][2]string{{"snapshot_path", p.vmstate}, {"backend_path", p.backendPath}} {
		if err := v.confined(c[0], c[1]); err != nil {
			return err
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.usable(); err != nil {
		return err
	}
	if v.st != stateNotStarted || v.configured {
		return errLoadAfter
	}
	if err := v.load(p, req); err != nil {
		v.st = stateFailed
		v.log.Error("snapshot load failed; the VMM is unusable", "snapshot", p.vmstate, "error", err)
		return faultf("Load snapshot error: %v", err)
	}
	return nil
}

func (v *vmm) load(p loadParams, req snapshotLoad) error {
	st, err := readVMState(p.vmstate)
	if err != nil {
		return err
	}
	// Firecracker's snapshot loader: same data format major, minor no newer.
	if !v.snap.loads(st.SnapshotVersion) {
		return faultf("Failed to restore from snapshot: Failed to get snapshot state from file: "+
			"Failed to load snapshot state from file: Invalid data version: %s", st.SnapshotVersion)
	}
	// Devices are re-opened on load: their backing files must still exist.
	for _, d := range st.Drives {
		if d.Socket == "" && d.PathOnHost != "" {
			if _, err := os.Stat(d.PathOnHost); err != nil {
				return fmt.Errorf("restore drive %s: %w", d.DriveID, err)
			}
		}
	}
	for _, o := range req.NetworkOverrides {
		found := false
		for i := range st.Interfaces {
			if st.Interfaces[i].IfaceID == o.IfaceID {
				st.Interfaces[i].HostDevName, found = o.HostDevName, true
			}
		}
		if !found {
			// Firecracker's SnapshotStateFromFileError::UnknownNetworkDevice.
			return fault("Failed to restore from snapshot: Failed to get snapshot state from file: Unknown Network Device.")
		}
	}
	if req.VsockOverride != nil {
		if st.Vsock == nil {
			// Firecracker's SnapshotStateFromFileError::UnknownVsockDevice.
			return fault("Failed to restore from snapshot: Failed to get snapshot state from file: Unknown Vsock Device.")
		}
		st.Vsock.UDSPath = req.VsockOverride.UDSPath
	}
	if st.Vsock != nil {
		if err := v.confined("uds_path", st.Vsock.UDSPath); err != nil {
			return err
		}
	}
	guest, err := parseBootArgs(st.BootArgs)
	if err != nil {
		return fmt.Errorf("vmstate boot args: %w", err)
	}
	lineage := newLineage()
	if err := writeDiskRecord(st.Drives, guest, lineage); err != nil {
		return faultf("Failed to restore from snapshot: Failed to build microVM from snapshot: %v", err)
	}
	// The snapshot's huge_pages decides the backing; a load cannot switch
	// it (Firecracker applies the vmstate's setting before mapping memory).
	huge := st.Machine.huge()
	var mem *guestMemory
	switch p.backendType {
	case "File":
		if huge {
			return v.refuseFileLoad(p.backendPath)
		}
		mem, err = mapFile(p.backendPath, st.Regions)
	case "Uffd":
		mem, err = v.mapUffd(p.backendPath, st.Regions, st.Workload.Config.DiscardPct > 0, huge)
	}
	if err != nil {
		return err
	}
	// Devices come after memory, as in Firecracker: each TAP by the name the
	// state holds, in this process's network namespace.
	taps, err := openTAPs(st.Interfaces)
	if err != nil {
		mem.close()
		return err
	}
	// The vsock device re-binds the path the state holds (or the override):
	// a relative one under this VMM's working directory. Before 1.15 the
	// host port counter starts afresh; from 1.15 it continues.
	var vs *vsockDevice
	if st.Vsock != nil {
		last := uint32(firstLocalPort)
		if v.rel.atLeast(1, 15, 0) && st.Vsock.LocalPortLast != 0 {
			last = st.Vsock.LocalPortLast
		}
		if vs, err = newVsockDevice(st.Vsock.vsockConfig, last, v.guestFacts, v.log); err != nil {
			closeTAPs(taps)
			mem.close()
			return faultf("Failed to restore from snapshot: Failed to build microVM from snapshot: %v", err)
		}
	}
	machine := st.Machine
	machine.TrackDirtyPages = p.track // not persisted in the snapshot: re-sent on every load
	var dirty *dirtyBitmap
	if p.track {
		dirty = newDirtyBitmap(mem.pages())
	}
	wl := newLoadedWorkload(mem, st.Workload, lineage, dirty, v.log)
	v.machine, v.drives, v.ifaces, v.taps, v.mem, v.restored = machine, st.Drives, st.Interfaces, taps, mem, true
	v.vsock, v.bootArgs, v.announce = vs, st.BootArgs, guest.vsockAnnounce
	v.wl.Store(wl)
	v.st = statePaused
	if p.resume {
		if err := v.resumeGuest(); err != nil {
			return err
		}
		v.st = stateRunning
	}
	v.log.Info("snapshot loaded", "snapshot", p.vmstate, "backend", p.backendType, "mem", p.backendPath,
		"regions", len(mem.regions), "steps", st.Workload.Steps, "generation", wl.generation, "state", v.st.String())
	return nil
}
