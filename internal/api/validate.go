package api

import (
	"fmt"
	"net/http"
	"net/netip"
	"regexp"
	"strings"
	"sync"
)

// Limits and defaults of requests. The Service may narrow them further.
const (
	NamePattern      = `^[a-z0-9][a-z0-9-]{0,62}$`
	MinVcpus         = 1
	MaxVcpus         = 32
	MinMemoryMiB     = 16
	MaxMemoryMiB     = 65536
	DefaultVcpus     = 1
	DefaultMemoryMiB = 256
	MaxBootArgsBytes = 4096
	MaxPathBytes     = 4096
	MaxDiskSizeMiB   = 16 << 20 // 16 TiB
)

// Actions lists the lifecycle actions of POST /instances/{id}/{action}.
func Actions() []string {
	return []string{"start", "pause", "resume", "standby", "restore", "stop"}
}

// IsAction reports whether a is a lifecycle action.
func IsAction(a string) bool {
	switch a {
	case "start", "pause", "resume", "standby", "restore", "stop":
		return true
	}
	return false
}

var (
	nameRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(NamePattern) })
	// idRE is the shape of the ids forkd generates: 24 lowercase hex digits.
	idRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[0-9a-f]{24}$`) })
)

// ValidateName checks a name against NamePattern. Names become directory and
// file names on the host, so this is also what keeps "../x" out of paths. A
// name with the shape of an id is refused: it would shadow the instance or
// snapshot whose id it is.
func ValidateName(what, name string) error {
	if err := validatePattern(what, name); err != nil {
		return err
	}
	if idRE().MatchString(name) {
		return errorf(http.StatusUnprocessableEntity, CodeInvalidName,
			"%s %q has the shape of an id (24 hex digits) and could shadow one; pick another name", what, name)
	}
	return nil
}

func validatePattern(what, name string) error {
	if !nameRE().MatchString(name) {
		return errorf(http.StatusUnprocessableEntity, CodeInvalidName,
			"%s %q is not a valid name: use 1-63 lowercase letters, digits and '-', starting with a letter or digit", what, name)
	}
	return nil
}

// ValidateRef checks a reference (id, name or id prefix) taken from a path.
// Ids and names share NamePattern, so a reference that fails it names nothing.
func ValidateRef(ref string) error { return validatePattern("reference", ref) }

// WithDefaults fills the sizes a request left out.
func (r CreateInstanceRequest) WithDefaults() CreateInstanceRequest {
	if r.Vcpus == 0 {
		r.Vcpus = DefaultVcpus
	}
	if r.MemoryMiB == 0 {
		r.MemoryMiB = DefaultMemoryMiB
	}
	if r.HugePages == "" {
		r.HugePages = HugePagesNone
	}
	return r
}

// Validate checks a create request (after WithDefaults). Errors wrap ErrInvalid.
func (r CreateInstanceRequest) Validate() error {
	if err := ValidateName("instance name", r.Name); err != nil {
		return err
	}
	if r.Vcpus < MinVcpus || r.Vcpus > MaxVcpus {
		return invalid("vcpus must be %d..%d, got %d", MinVcpus, MaxVcpus, r.Vcpus)
	}
	if r.MemoryMiB < MinMemoryMiB || r.MemoryMiB > MaxMemoryMiB {
		return invalid("memory_mib must be %d..%d, got %d", MinMemoryMiB, MaxMemoryMiB, r.MemoryMiB)
	}
	if len(r.BootArgs) > MaxBootArgsBytes {
		return invalid("boot_args is %d bytes; at most %d", len(r.BootArgs), MaxBootArgsBytes)
	}
	if len(r.Kernel) > MaxPathBytes || len(r.Rootfs) > MaxPathBytes || len(r.Image) > MaxPathBytes {
		return invalid("kernel, rootfs and image are at most %d bytes", MaxPathBytes)
	}
	if r.Image != "" && r.Rootfs != "" {
		return invalid("give either image or rootfs, not both")
	}
	if r.DiskSizeMiB != 0 && r.Image == "" {
		return invalid("disk_size_mib needs an image (a rootfs is used at its own size)")
	}
	if r.DiskSizeMiB < 0 || r.DiskSizeMiB > MaxDiskSizeMiB {
		return invalid("disk_size_mib must be 1..%d, got %d", MaxDiskSizeMiB, r.DiskSizeMiB)
	}
	switch r.HugePages {
	case HugePagesNone:
	case HugePages2M:
		if r.MemoryMiB%2 != 0 {
			return invalid("memory_mib must be even with huge_pages 2M (whole 2 MiB pages), got %d", r.MemoryMiB)
		}
	default:
		return invalid("huge_pages must be %q or %q, got %q", HugePagesNone, HugePages2M, r.HugePages)
	}
	if r.Network != nil && r.Network.Enabled != nil && !*r.Network.Enabled && len(r.Publish) > 0 {
		return invalid("publish needs a network; drop network.enabled=false or the publishes")
	}
	return validatePublish(r.Publish)
}

// ValidateImageRef checks an image reference or digest taken from a path
// or body: non-empty and at most MaxPathBytes (the daemon parses it).
func ValidateImageRef(ref string) error {
	if ref == "" || len(ref) > MaxPathBytes || strings.ContainsAny(ref, "\x00\n") {
		return errorf(http.StatusUnprocessableEntity, CodeInvalidName,
			"image reference %q is empty, too long or holds a NUL or newline", ref)
	}
	return nil
}

// Validate checks a pull request.
func (r PullRequest) Validate() error {
	if err := ValidateImageRef(r.Ref); err != nil {
		return err
	}
	if len(r.Platform) > 64 {
		return invalid("platform is at most 64 bytes")
	}
	return nil
}

// MaxPublishes bounds the ports one request may publish.
const MaxPublishes = 64

func validatePublish(ps []PortPublish) error {
	if len(ps) > MaxPublishes {
		return invalid("at most %d published ports, got %d", MaxPublishes, len(ps))
	}
	for i, p := range ps {
		if p.HostPort < 1 || p.HostPort > 65535 || p.GuestPort < 1 || p.GuestPort > 65535 {
			return invalid("publish[%d]: host_port and guest_port must be 1-65535, got %d and %d", i, p.HostPort, p.GuestPort)
		}
		switch p.Protocol {
		case "", "tcp", "udp":
		default:
			return invalid("publish[%d]: protocol must be tcp or udp, got %q", i, p.Protocol)
		}
		if p.HostIP != "" {
			if ip, err := netip.ParseAddr(p.HostIP); err != nil || !ip.Is4() {
				return invalid("publish[%d]: host_ip %q is not an IPv4 address", i, p.HostIP)
			}
		}
		for j := range i {
			q := ps[j]
			if q.HostPort == p.HostPort && protoOf(q) == protoOf(p) && (q.HostIP == p.HostIP || q.HostIP == "" || p.HostIP == "") {
				return invalid("publish[%d] and publish[%d] both claim host port %d/%s", j, i, p.HostPort, protoOf(p))
			}
		}
	}
	return nil
}

func protoOf(p PortPublish) string {
	if p.Protocol == "" {
		return "tcp"
	}
	return p.Protocol
}

// Validate checks an action's optional body.
func (r ActionRequest) Validate() error { return validateBackend(r.RestoreBackend) }

// Validate checks a fork request.
func (r ForkRequest) Validate() error {
	if err := ValidateName("fork name", r.Name); err != nil {
		return err
	}
	switch r.TargetState {
	case "", StateStandby, StateRunning, StateStopped:
	default:
		return invalid("target_state must be Standby, Running or Stopped, got %q", r.TargetState)
	}
	if err := validatePublish(r.Publish); err != nil {
		return err
	}
	return validateBackend(r.RestoreBackend)
}

// Validate checks a fork batch request: its count, and that every name it
// makes (the longest is Name-Count) is a valid name.
func (r ForkBatchRequest) Validate() error {
	if r.Count < 1 || r.Count > MaxForkBatch {
		return invalid("count must be 1..%d, got %d", MaxForkBatch, r.Count)
	}
	if err := ValidateName("fork name", r.Name); err != nil {
		return err
	}
	if err := ValidateName("fork name", fmt.Sprintf("%s-%d", r.Name, r.Count)); err != nil {
		return err
	}
	switch r.TargetState {
	case "", StateStandby, StateRunning, StateStopped:
	default:
		return invalid("target_state must be Standby, Running or Stopped, got %q", r.TargetState)
	}
	return validateBackend(r.RestoreBackend)
}

// Validate checks a snapshot request.
func (r SnapshotRequest) Validate() error {
	if err := ValidateName("snapshot name", r.Name); err != nil {
		return err
	}
	switch r.Compression {
	case "", "none", "zstd":
		return nil
	default:
		return invalid("compression must be none or zstd, got %q", r.Compression)
	}
}

func validateBackend(b string) error {
	switch b {
	case "", BackendFile, BackendUffd:
		return nil
	default:
		return invalid("restore_backend must be file or uffd, got %q", b)
	}
}

func invalid(format string, args ...any) error {
	return errorf(http.StatusUnprocessableEntity, CodeInvalidRequest, format, args...)
}
