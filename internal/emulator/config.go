package emulator

import (
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"strings"
)

// machineConfig is PUT/GET /machine-config, with Firecracker's defaults
// (1 vCPU, 128 MiB, no SMT, no dirty tracking).
type machineConfig struct {
	VCPUCount       int    `json:"vcpu_count"`
	MemSizeMib      int    `json:"mem_size_mib"`
	SMT             bool   `json:"smt"`
	TrackDirtyPages bool   `json:"track_dirty_pages"`
	HugePages       string `json:"huge_pages,omitempty"`
	CPUTemplate     string `json:"cpu_template,omitempty"`
}

func defaultMachineConfig() machineConfig {
	return machineConfig{VCPUCount: 1, MemSizeMib: 128, HugePages: "None"}
}

// machineConfigUpdate is the request body: PUT needs vcpu_count and
// mem_size_mib, PATCH any subset.
type machineConfigUpdate struct {
	VCPUCount       *int    `json:"vcpu_count"`
	MemSizeMib      *int    `json:"mem_size_mib"`
	SMT             *bool   `json:"smt"`
	TrackDirtyPages *bool   `json:"track_dirty_pages"`
	HugePages       *string `json:"huge_pages"`
	CPUTemplate     *string `json:"cpu_template"`
}

// Firecracker's refusals of a machine configuration (MachineConfigError,
// "Machine config error: ..." at the API).
const (
	errVCPUCount fault = "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled."
	errMemSize   fault = "Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size."
)

// apply merges u into c and checks the result as Firecracker's
// MachineConfig::update does: the vCPU count, then the memory size, which
// with huge_pages 2M must be a whole number of 2 MiB pages (checked on the
// merged config, so a PATCH of either field alone is checked against the
// other). Checks against other resources (balloon, initrd) are the VMM's
// (checkMachineAgainstBoot).
func (u machineConfigUpdate) apply(c machineConfig) (machineConfig, error) {
	if u.HugePages != nil && *u.HugePages != "None" && *u.HugePages != hugePages2M {
		// serde refuses an unknown enum variant while decoding the body.
		return c, deserializeError{fmt.Sprintf("unknown variant `%s`, expected `None` or `2M`", *u.HugePages)}
	}
	if u.VCPUCount != nil {
		c.VCPUCount = *u.VCPUCount
	}
	if u.MemSizeMib != nil {
		c.MemSizeMib = *u.MemSizeMib
	}
	if u.SMT != nil {
		c.SMT = *u.SMT
	}
	if u.TrackDirtyPages != nil {
		c.TrackDirtyPages = *u.TrackDirtyPages
	}
	if u.HugePages != nil {
		c.HugePages = *u.HugePages
	}
	if u.CPUTemplate != nil {
		c.CPUTemplate = *u.CPUTemplate
	}
	if c.VCPUCount < 1 || c.VCPUCount > maxVCPUs || (c.SMT && c.VCPUCount > 1 && c.VCPUCount%2 != 0) {
		return c, errVCPUCount
	}
	if c.MemSizeMib < 1 || (c.huge() && c.MemSizeMib%(hugePageSize>>20) != 0) {
		return c, errMemSize
	}
	return c, nil
}

// huge reports huge_pages 2M: guest memory is 2 MiB hugetlbfs pages.
func (c machineConfig) huge() bool { return c.HugePages == hugePages2M }

type bootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	BootArgs        string `json:"boot_args,omitempty"`
	InitrdPath      string `json:"initrd_path,omitempty"`
}

type drive struct {
	DriveID      string          `json:"drive_id"`
	IsRootDevice bool            `json:"is_root_device"`
	PartUUID     string          `json:"partuuid,omitempty"`
	CacheType    string          `json:"cache_type,omitempty"`
	IsReadOnly   bool            `json:"is_read_only"`
	PathOnHost   string          `json:"path_on_host,omitempty"`
	RateLimiter  json.RawMessage `json:"rate_limiter,omitempty"`
	IOEngine     string          `json:"io_engine,omitempty"`
	Socket       string          `json:"socket,omitempty"`
}

// netIface is a network interface as PUT /network-interfaces gives it and
// as the vmstate keeps it (Firecracker keeps the TAP name and the MAC in
// its net device state and reopens the TAP by that name on load).
type netIface struct {
	IfaceID       string          `json:"iface_id"`
	HostDevName   string          `json:"host_dev_name"`
	GuestMAC      macAddr         `json:"guest_mac,omitempty"`
	MTU           int             `json:"mtu,omitempty"`
	RxRateLimiter json.RawMessage `json:"rx_rate_limiter,omitempty"`
	TxRateLimiter json.RawMessage `json:"tx_rate_limiter,omitempty"`
}

// macAddr is a MAC address in Firecracker's form: six colon-separated
// pairs of hex digits (either case; kept lower case, as Firecracker prints
// it). A malformed one is refused while decoding, with Firecracker's words.
type macAddr string

func (m *macAddr) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	hw, ok := parseMAC(s)
	if !ok {
		return fault("The provided MAC address is invalid.")
	}
	*m = macAddr(hw.String())
	return nil
}

// parseMAC is Firecracker's MacAddr::from_str: exactly six fields of
// exactly two hex digits.
func parseMAC(s string) (net.HardwareAddr, bool) {
	f := strings.Split(s, ":")
	if len(f) != 6 {
		return nil, false
	}
	hw := make(net.HardwareAddr, 6)
	for i, x := range f {
		n, err := strconv.ParseUint(x, 16, 8)
		if len(x) != 2 || err != nil {
			return nil, false
		}
		hw[i] = byte(n)
	}
	return hw, true
}

// guestArgs are the forkd.* boot args the workload reads (see the package
// doc). Unset fields are 0 and get defaults in workloadFor.
type guestArgs struct {
	wsMib, writePct, rate, seed, discardPct, splitMib, loadSeed uint64
	vsockAnnounce                                               uint64 // host vsock port the guest connects to at boot and restore
	diskWrite                                                   uint64 // 1: the guest writes its root drive at boot and load (disk.go)
	set                                                         map[string]bool
}

// parseBootArgs reads the forkd.* keys of a kernel command line. Other
// words are the kernel's business and ignored; a forkd.* key with a bad
// value is refused, so a typo does not silently run the default workload.
func parseBootArgs(cmdline string) (guestArgs, error) {
	g := guestArgs{set: map[string]bool{}}
	for _, word := range strings.Fields(cmdline) {
		key, val, ok := strings.Cut(word, "=")
		if !strings.HasPrefix(key, "forkd.") {
			continue
		}
		dst := map[string]*uint64{
			"forkd.ws_mib": &g.wsMib, "forkd.write_pct": &g.writePct, "forkd.rate": &g.rate,
			"forkd.seed": &g.seed, "forkd.discard_pct": &g.discardPct, "forkd.split_mib": &g.splitMib,
			"forkd.load_seed":      &g.loadSeed,
			"forkd.vsock_announce": &g.vsockAnnounce,
			"forkd.disk_write":     &g.diskWrite,
		}[key]
		if dst == nil {
			return g, fmt.Errorf("boot_args: unknown forkd key %q", key)
		}
		n, err := strconv.ParseUint(val, 10, 64)
		if !ok || err != nil {
			return g, fmt.Errorf("boot_args: %s wants a non-negative integer, got %q", key, val)
		}
		if (key == "forkd.write_pct" || key == "forkd.discard_pct") && n > 100 {
			return g, fmt.Errorf("boot_args: %s=%d is not a percentage", key, n)
		}
		if (key == "forkd.load_seed" || key == "forkd.disk_write") && n > 1 {
			return g, fmt.Errorf("boot_args: %s=%d: want 0 or 1", key, n)
		}
		if key == "forkd.vsock_announce" && (n == 0 || n > 1<<32-1) {
			return g, fmt.Errorf("boot_args: %s=%d is not a vsock port (1 to 4294967295)", key, n)
		}
		*dst = n
		g.set[key] = true
	}
	return g, nil
}

// Workload defaults.
const (
	defaultWSMib    = 64
	defaultWritePct = 20
	defaultRate     = 2000
	defaultSeed     = 1
)

// workloadFor turns boot args into the workload configuration for a VM of
// memBytes, and the region split.
func workloadFor(g guestArgs, vcpus int, memBytes uint64) (workloadConfig, uint64) {
	pages := memBytes / pageSize
	cfg := workloadConfig{VCPUs: vcpus, WritePct: defaultWritePct, Rate: defaultRate, Seed: defaultSeed}
	want := min(uint64(defaultWSMib)<<20, memBytes/2) / pageSize
	if g.set["forkd.ws_mib"] {
		want = g.wsMib << 20 / pageSize
	}
	cfg.WSPages = clampWorkingSet(want, pages)
	if g.set["forkd.write_pct"] {
		cfg.WritePct = g.writePct
	}
	if g.set["forkd.rate"] {
		cfg.Rate = g.rate
	}
	if g.set["forkd.seed"] {
		cfg.Seed = g.seed
	}
	cfg.DiscardPct = g.discardPct
	cfg.LoadSeed = g.loadSeed == 1
	split := x86MMIOGapStart
	if g.set["forkd.split_mib"] {
		split = g.splitMib << 20
	}
	return cfg, split
}
