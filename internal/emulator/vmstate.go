package emulator

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc64"
	"os"
)

// The vmstate file: magic (16 bytes) | format version (u32) | reserved (u32)
// | body length (u64) | body (JSON) | CRC64-ECMA of everything before it.
// Any change to the container or the body's meaning bumps the format
// version, and a load refuses a version or checksum it does not know.
// Which Firecracker release may load a vmstate is the body's
// snapshot_version (Firecracker's snapshot data version), not this.
//
// Format versions: 1, the body without firecracker_version and
// snapshot_version (written by the emulator when it stood for 1.13 only: read
// as snapshot data version 8.0.0); 2, the body with them; 3, with the vsock
// device (an older reader would drop it silently, hence the bump); 4, a
// machine_config whose huge_pages is 2M (hugetlbfs guest memory). Version 4
// is written only for such a vmstate, so a reader that predates huge pages
// refuses it rather than restore it in 4 KiB pages (or through File), and
// every other vmstate stays readable by it.
const (
	vmstateMagic            = "FORKD-VMSTATE\x00\x00\x00"
	vmstateFormatVersion    = 4 // the newest this VMM reads
	vmstateFormatNoHugePage = 3 // what it writes without huge pages
	vmstateHeaderLen        = 16 + 4 + 4 + 8
)

// vmState is the vmstate body: the machine, its devices, the memory layout
// and the guest's "CPU" state.
type vmState struct {
	VMMVersion string `json:"vmm_version"`
	// FirecrackerVersion is the release that wrote it; SnapshotVersion its
	// snapshot data version, which decides which releases may load it.
	FirecrackerVersion string          `json:"firecracker_version"`
	SnapshotVersion    snapshotVersion `json:"snapshot_version"`
	Machine            machineConfig   `json:"machine_config"`
	BootArgs           string          `json:"boot_args"`
	Drives             []drive         `json:"drives"`
	Interfaces         []netIface      `json:"network_interfaces"`
	Regions            []region        `json:"regions"`
	Workload           workloadState   `json:"workload"`
	Vsock              *vsockState     `json:"vsock,omitempty"`
}

func encodeVMState(st *vmState) ([]byte, error) {
	body, err := json.Marshal(st)
	if err != nil {
		return nil, fmt.Errorf("encode vmstate: %w", err)
	}
	format := uint32(vmstateFormatNoHugePage)
	if st.Machine.huge() {
		format = vmstateFormatVersion
	}
	var b bytes.Buffer
	b.WriteString(vmstateMagic)
	binary.Write(&b, binary.LittleEndian, format)
	binary.Write(&b, binary.LittleEndian, uint32(0))
	binary.Write(&b, binary.LittleEndian, uint64(len(body)))
	b.Write(body)
	binary.Write(&b, binary.LittleEndian, crc64.Checksum(b.Bytes(), crcTable()))
	return b.Bytes(), nil
}

func decodeVMState(data []byte) (*vmState, error) {
	if len(data) < vmstateHeaderLen+8 || string(data[:16]) != vmstateMagic {
		return nil, fmt.Errorf("not a forkd vmstate file (bad magic or too short: %d bytes)", len(data))
	}
	format := le.Uint32(data[16:])
	if format < 1 || format > vmstateFormatVersion {
		return nil, fmt.Errorf("vmstate format version %d is not supported (this VMM reads versions 1 to %d)", format, vmstateFormatVersion)
	}
	n := le.Uint64(data[24:])
	if n != uint64(len(data)-vmstateHeaderLen-8) {
		return nil, fmt.Errorf("vmstate body length %d does not match the file (%d bytes)", n, len(data))
	}
	end := vmstateHeaderLen + int(n)
	if got, want := crc64.Checksum(data[:end], crcTable()), le.Uint64(data[end:]); got != want {
		return nil, fmt.Errorf("vmstate CRC64 mismatch: computed %#x, file says %#x", got, want)
	}
	var st vmState
	if err := json.Unmarshal(data[vmstateHeaderLen:end], &st); err != nil {
		return nil, fmt.Errorf("decode vmstate body: %w", err)
	}
	if format == 1 {
		st.FirecrackerVersion, st.SnapshotVersion = "1.13.0", snapshotVersion{8, 0, 0}
	}
	if st.Machine.huge() && format < 4 {
		return nil, fmt.Errorf("vmstate format version %d cannot hold huge_pages 2M", format)
	}
	return &st, st.validate()
}

// validate checks what the loader relies on, so a well-formed but wrong
// vmstate is refused instead of crashing the workload.
func (st *vmState) validate() error {
	if st.SnapshotVersion.Major < 1 {
		return fmt.Errorf("vmstate: no snapshot data version")
	}
	c := st.Workload.Config
	if st.Machine.VCPUCount < 1 || st.Machine.VCPUCount > maxVCPUs || c.VCPUs != st.Machine.VCPUCount ||
		len(st.Workload.Steps) != c.VCPUs {
		return fmt.Errorf("vmstate: inconsistent vCPU count (machine %d, workload %d, %d step counters)",
			st.Machine.VCPUCount, c.VCPUs, len(st.Workload.Steps))
	}
	// Bound the size first: a negative or enormous mem_size_mib would make
	// the shift below wrap and match regions whose sizes wrap too.
	if st.Machine.MemSizeMib < 1 || st.Machine.MemSizeMib > 1<<30 {
		return fmt.Errorf("vmstate: mem_size_mib %d out of range", st.Machine.MemSizeMib)
	}
	size := totalSize(st.Regions)
	if len(st.Regions) == 0 || size != uint64(st.Machine.MemSizeMib)<<20 {
		return fmt.Errorf("vmstate: regions cover %d bytes, machine has %d MiB", size, st.Machine.MemSizeMib)
	}
	// Older vmstates hold "" or "None"; hugetlbfs memory is mapped in whole
	// huge pages and never discarded (the config refuses both).
	unit := uint64(pageSize)
	switch st.Machine.HugePages {
	case "", "None":
	case hugePages2M:
		unit = hugePageSize
		if c.DiscardPct > 0 {
			return fmt.Errorf("vmstate: huge_pages 2M with a workload that discards pages")
		}
	default:
		return fmt.Errorf("vmstate: huge_pages %q is neither None nor 2M", st.Machine.HugePages)
	}
	var off uint64
	for _, r := range st.Regions {
		if r.Offset != off || r.Size == 0 || r.Size > size || r.Size%unit != 0 {
			return fmt.Errorf("vmstate: region at offset %d size %d breaks the contiguous layout", r.Offset, r.Size)
		}
		off += r.Size
	}
	if clampWorkingSet(c.WSPages, size/pageSize) != c.WSPages {
		return fmt.Errorf("vmstate: working set of %d pages does not fit in %d pages", c.WSPages, size/pageSize)
	}
	return nil
}

// writeVMStateInPlace writes the vmstate as Firecracker does
// (snapshot_state_to_file): open with create|write|truncate, write, fsync.
// No temp file and no rename: an existing vmstate is rewritten in its own
// inode (under every link it has), and a crash midway leaves it torn, which
// a load refuses (length, checksum). crash, when set, is called after half
// the bytes (the test hook FORKD_TEST_VMM_CRASH_AT=vmstate).
func writeVMStateInPlace(path string, st *vmState, crash func(*os.File)) error {
	data, err := encodeVMState(st)
	if err != nil {
		return faultf("Cannot serialize the microVM state: %v", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return faultf("Cannot perform open on the snapshot backing file: %v", err)
	}
	defer f.Close()
	if crash != nil {
		f.Write(data[:len(data)/2])
		crash(f)
	}
	if _, err := f.Write(data); err != nil {
		return faultf("Cannot serialize the microVM state: %v", err)
	}
	if err := f.Sync(); err != nil {
		return faultf("Cannot perform sync_all on the snapshot backing file: %v", err)
	}
	return f.Close()
}

func readVMState(path string) (*vmState, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read vmstate: %w", err)
	}
	return decodeVMState(data)
}

// Devices are the host resources a vmstate names: what a VMM loading it
// opens (drive files, the vsock socket it binds, the TAPs it attaches),
// each exactly as recorded. Relative paths resolve against the loading
// VMM's working directory.
type Devices struct {
	Drives []string // path_on_host of each drive
	Vsock  string   // uds_path of the vsock device, "" for none
	TAPs   []string // host_dev_name of each network interface
}

// ReadDevices reads a vmstate and lists the host resources it names, for
// checks that a VM's snapshot names nothing of another VM's (a fork must
// open its own disk and bind its own sockets).
func ReadDevices(path string) (Devices, error) {
	st, err := readVMState(path)
	if err != nil {
		return Devices{}, err
	}
	var d Devices
	for _, dr := range st.Drives {
		d.Drives = append(d.Drives, dr.PathOnHost)
	}
	if st.Vsock != nil {
		d.Vsock = st.Vsock.UDSPath
	}
	for _, n := range st.Interfaces {
		d.TAPs = append(d.TAPs, n.HostDevName)
	}
	return d, nil
}
