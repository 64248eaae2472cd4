package api

import (
	"fmt"
	"time"
)

// Instance states (docs/architecture.md §5). Transient states are shown while an
// operation holds the instance's write lock.
const (
	StateCreated    = "Created"
	StateRunning    = "Running"
	StatePaused     = "Paused"
	StateStandby    = "Standby"
	StateStopped    = "Stopped"
	StateForking    = "Forking"
	StateStandingby = "Standingby"
	StateRestoring  = "Restoring"
	StateError      = "Error"
)

// Fork modes: how a fork got its mem-file.
const (
	ForkModeHardlink = "hardlink"
	ForkModeReflink  = "reflink"
	ForkModeCopy     = "copy"
)

// Restore backends.
const (
	BackendFile = "file"
	BackendUffd = "uffd"
)

// Huge page settings of a VM's guest memory (huge_pages). A VM backed by
// 2 MiB pages draws its memory from the host's hugetlbfs pool; Firecracker
// restores such a VM only through a pager (the uffd backend).
const (
	HugePagesNone = "none"
	HugePages2M   = "2M"
)

// Instance is the JSON shape of one VM.
type Instance struct {
	ID               string    `json:"id"`
	Name             string    `json:"name"`
	State            string    `json:"state"`
	Vcpus            int       `json:"vcpus"`
	MemoryMiB        int       `json:"memory_mib"`
	Kernel           string    `json:"kernel,omitempty"`
	Rootfs           string    `json:"rootfs,omitempty"`
	BootArgs         string    `json:"boot_args,omitempty"`
	CreatedAt        time.Time `json:"created_at"`
	Source           string    `json:"source"`             // "" or "instance:<id>" / "snapshot:<id>"
	SnapshotCacheKey string    `json:"snapshot_cache_key"` // "" until first standby/snapshot
	MemoryCheck      string    `json:"memory_check"`       // "ok", "unknown" or first integrity error
	ForkMode         string    `json:"fork_mode"`          // "" for non-forks
	RestoreBackend   string    `json:"restore_backend"`    // backend of the last/next restore
	HugePages        string    `json:"huge_pages"`         // "none" | "2M"; forks inherit it
	Pid              int       `json:"pid,omitempty"`
	Error            string    `json:"error"` // "" unless Stopped (why the VMM stopped) or Error (what failed)
	// Network is the VM's network; Publish its published ports.
	Network InstanceNetwork `json:"network"`
	Publish []PortPublish   `json:"publish,omitempty"`
	Image   string          `json:"image,omitempty"` // digest of the image its disk came from
	// Prefetch is the working-set prefetch of the last restore since the
	// daemon started (absent with prefetch off, or before any restore).
	Prefetch *Prefetch `json:"prefetch,omitempty"`
	Vsock    *Vsock    `json:"vsock,omitempty"`
}

// Vsock is an instance's vsock device: its guest CID and the host path of
// its Unix socket (Firecracker's host side: connect, send "CONNECT
// <port>\n", read "OK <host port>\n").
type Vsock struct {
	CID     uint32 `json:"cid"`
	UDSPath string `json:"uds_path"`
}

// InstanceNetwork is the network of an instance: reach it at Address.
type InstanceNetwork struct {
	Enabled      bool   `json:"enabled"`
	Address      string `json:"address,omitempty"`       // unique host-side address (from network_cidr)
	GuestAddress string `json:"guest_address,omitempty"` // the address the guest holds (shared by every VM)
	GuestMAC     string `json:"guest_mac,omitempty"`
	Namespace    string `json:"namespace,omitempty"` // the named network namespace its VMM runs in
}

// NetworkRequest is the network part of a create request.
type NetworkRequest struct {
	Enabled *bool `json:"enabled,omitempty"` // default: the daemon's network_default
}

// PortPublish is one published port, as Docker's -p: connections to
// HostPort on HostIP (every address of the host when empty) reach the
// guest's GuestPort.
type PortPublish struct {
	HostIP    string `json:"host_ip,omitempty"`
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
	Protocol  string `json:"protocol,omitempty"` // tcp (default) | udp
}

// Prefetch is what a restore did with its cache key's working set. Its page
// counts are of 4 KiB pages whatever the guest's page size (a VM backed by
// 2 MiB pages counts 512 for each).
type Prefetch struct {
	// Mode is "record" (this restore recorded the key's working set),
	// "replay" (it prefetched the recording) or "none" (another restore of
	// the key is recording it, or the recording could not be used: Error).
	Mode string `json:"mode"`
	// PagesRecorded is the pages of the recording (made, or replayed).
	PagesRecorded uint64 `json:"pages_recorded"`
	// PagesPrefetched is pages replay brought in ahead of the guest: File,
	// pages the readahead read that the page cache did not hold; Uffd,
	// pages the pager installed without a fault.
	PagesPrefetched uint64 `json:"pages_prefetched"`
	// PagesWasted is prefetched pages the guest had not used when the
	// prefetch window closed: File, pages its VMM never mapped; Uffd, an
	// estimate from a sample of the recorded pages left to fault (at most
	// one in 128, and at most 64 pages of the guest's size per replay).
	PagesWasted uint64 `json:"pages_wasted"`
	// WorkingSetMs is, for a replay, the time from the restore call until
	// the whole recorded working set was in memory (0 if not within the
	// window).
	WorkingSetMs int64 `json:"working_set_ms"`
	// Done is set once the figures are final (the window has closed).
	Done  bool   `json:"done"`
	Error string `json:"error,omitempty"`
}

// Snapshot is the JSON shape of one immutable snapshot in the store.
type Snapshot struct {
	ID               string    `json:"id"`
	Name             string    `json:"name"`
	SourceInstance   string    `json:"source_instance"`
	CreatedAt        time.Time `json:"created_at"`
	SizeBytes        int64     `json:"size_bytes"`
	Compression      string    `json:"compression"` // "none" | "zstd"
	State            string    `json:"state"`       // "ready" | "compressing" | "compressed" | "broken" (files gone: refuses forks)
	SnapshotCacheKey string    `json:"snapshot_cache_key"`
	MemoryMiB        int       `json:"memory_mib"`
	Vcpus            int       `json:"vcpus"`
	Image            string    `json:"image,omitempty"` // digest of the image its disk came from
	HugePages        string    `json:"huge_pages"`      // "none" | "2M", as its source
}

// CreateInstanceRequest is the body of POST /instances.
type CreateInstanceRequest struct {
	Name      string `json:"name"`
	Vcpus     int    `json:"vcpus,omitempty"`      // default 1
	MemoryMiB int    `json:"memory_mib,omitempty"` // default 256
	Kernel    string `json:"kernel,omitempty"`
	Rootfs    string `json:"rootfs,omitempty"`
	BootArgs  string `json:"boot_args,omitempty"`
	Start     *bool  `json:"start,omitempty"` // default true
	// Network turns the VM's network on or off (default network_default);
	// Publish publishes ports to it (needs a network).
	Network *NetworkRequest `json:"network,omitempty"`
	Publish []PortPublish   `json:"publish,omitempty"`
	// Image is a reference (pulled first if missing) or digest whose root
	// filesystem the VM's disk is cloned from; exclusive with Rootfs.
	Image string `json:"image,omitempty"`
	// DiskSizeMiB grows an image's disk to this size (default: the image's).
	DiskSizeMiB int `json:"disk_size_mib,omitempty"`
	// HugePages backs the guest's memory with 2 MiB pages ("2M") or not
	// ("none", the default). A 2M VM needs an even memory_mib, free pages
	// in the host's pool (vm.nr_hugepages), and restores only with the uffd
	// backend; its forks inherit it.
	HugePages string `json:"huge_pages,omitempty"`
}

// ActionRequest is the optional body of lifecycle actions
// (POST /instances/{id}/{action}). Only restore reads RestoreBackend.
type ActionRequest struct {
	RestoreBackend string `json:"restore_backend,omitempty"` // "file" | "uffd"; default from config
}

// ForkRequest is the body of POST /instances/{id}/fork and /snapshots/{id}/fork.
type ForkRequest struct {
	Name           string `json:"name"`
	FromRunning    bool   `json:"from_running,omitempty"`
	TargetState    string `json:"target_state,omitempty"`    // Standby|Running|Stopped; default: source's state
	RestoreBackend string `json:"restore_backend,omitempty"` // for target_state Running; default fork_restore_backend
	// Publish gives the fork its own published ports (forks never inherit
	// their source's).
	Publish []PortPublish `json:"publish,omitempty"`
}

// MaxForkBatch is the most forks one ForkBatchRequest makes.
const MaxForkBatch = 1000

// ForkBatchRequest is the body of POST /instances/{id}/forks and POST
// /snapshots/{id}/forks: Count forks of one source in one call, named
// Name-1..Name-Count. A batch is all or nothing: it returns every fork, or
// an error and no fork. It takes no publish (every fork would claim the same
// host port) and no from_running (a live source is forked once, and that
// fork forked in a batch).
type ForkBatchRequest struct {
	Name           string `json:"name"`
	Count          int    `json:"count"`
	TargetState    string `json:"target_state,omitempty"`    // Standby|Running|Stopped; default: source's state
	RestoreBackend string `json:"restore_backend,omitempty"` // for target_state Running; default fork_restore_backend
}

// Names are the batch's fork names, in order: Name-1..Name-Count.
func (r ForkBatchRequest) Names() []string {
	names := make([]string, r.Count)
	for i := range names {
		names[i] = fmt.Sprintf("%s-%d", r.Name, i+1)
	}
	return names
}

// ForkBatch is the answer to a ForkBatchRequest: the forks, in name order.
type ForkBatch struct {
	Forks []Instance `json:"forks"`
}

// SnapshotRequest is the body of POST /instances/{id}/snapshots.
type SnapshotRequest struct {
	Name        string `json:"name"`
	Compression string `json:"compression,omitempty"` // "none" (default) | "zstd"
}

// Image is the JSON shape of one image: a root filesystem built from a
// container image, identified by its platform manifest's digest.
type Image struct {
	Digest       string      `json:"digest"`
	Refs         []string    `json:"refs"`          // references that point at it
	SizeBytes    int64       `json:"size_bytes"`    // apparent size of its ext4 image: a VM's default disk size
	DiskBytes    int64       `json:"disk_bytes"`    // what that image file allocates on the host
	ContentBytes int64       `json:"content_bytes"` // what its files take
	Platform     string      `json:"platform"`
	Layers       int         `json:"layers"`
	CreatedAt    time.Time   `json:"created_at"`
	Config       ImageConfig `json:"config"`
}

// ImageConfig is what the image says to run.
type ImageConfig struct {
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
	Env        []string `json:"env,omitempty"`
	WorkingDir string   `json:"working_dir,omitempty"`
	User       string   `json:"user,omitempty"`
}

// PullRequest is the body of POST /images/pull.
type PullRequest struct {
	Ref      string `json:"ref"`
	Platform string `json:"platform,omitempty"` // os/arch[/variant]; default linux/<host arch>
}

// Pull states.
const (
	PullRunning   = "running"
	PullSucceeded = "succeeded"
	PullFailed    = "failed"
)

// Pull is one image pull, as POST /images/pull starts it and GET
// /images/pulls/{id} reports it: poll until State is not running.
type Pull struct {
	ID          string     `json:"id"`
	Ref         string     `json:"ref"`
	Platform    string     `json:"platform"`
	State       string     `json:"state"` // running | succeeded | failed
	Phase       string     `json:"phase"` // resolving | fetching | building | done
	LayersDone  int        `json:"layers_done"`
	LayersTotal int        `json:"layers_total"`
	BytesDone   int64      `json:"bytes_done"`  // compressed layer bytes downloaded
	BytesTotal  int64      `json:"bytes_total"` // compressed layer bytes in all
	Image       *Image     `json:"image,omitempty"`
	Error       *Error     `json:"error,omitempty"`
	StartedAt   time.Time  `json:"started_at"`
	FinishedAt  *time.Time `json:"finished_at,omitempty"`
}

// ImageGC is the answer of POST /images/gc.
type ImageGC struct {
	Deleted    []Image `json:"deleted"`
	FreedBytes int64   `json:"freed_bytes"` // disk_bytes of the deleted images
}

// Error is the body of every error response.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Health is the body of GET /health.
type Health struct {
	Status  string `json:"status"`
	Version string `json:"version"`
	// Advice names what on this host costs users and how to fix it (a data
	// dir that cannot reflink, say); absent when there is nothing to say.
	Advice []string `json:"advice,omitempty"`
	// Jailer is how VMMs are confined: the jailer's path, or "none".
	Jailer string `json:"jailer"`
	// Warnings name what a production host should not run with.
	Warnings []string `json:"warnings,omitempty"`
}

// HealthReporter is what a Service may add to GET /health.
type HealthReporter interface {
	// Health fills in the jailer and warnings.
	Health() Health
}

// Event types (GET /events).
const (
	EventInstanceCreated = "instance.created" // a create finished: the instance exists
	EventInstanceForked  = "instance.forked"  // a fork finished: the fork exists (its source is in Instance.Source)
	EventInstanceState   = "instance.state"   // an instance changed state
	EventInstanceError   = "instance.error"   // an operation on it failed, or its guest reported memory corruption
	EventInstanceDeleted = "instance.deleted" // an instance is gone
	EventSnapshotCreated = "snapshot.created" // a snapshot is stored
	EventSnapshotState   = "snapshot.state"   // a snapshot changed state (compressing, compressed, broken)
	EventSnapshotDeleted = "snapshot.deleted" // a snapshot is gone
)

// Event is one thing that happened, as GET /events streams it: instance
// events carry Instance, snapshot events Snapshot. State is the subject's
// state after the event; Error says what failed (instance.error, a
// Stopped or Error state), "" otherwise.
type Event struct {
	Time     time.Time `json:"time"`
	Type     string    `json:"type"`
	Instance *EventRef `json:"instance,omitempty"`
	Snapshot *EventRef `json:"snapshot,omitempty"`
	State    string    `json:"state"`
	Error    string    `json:"error"`
}

// EventRef names an event's subject.
type EventRef struct {
	ID   string `json:"id"`
	Name string `json:"name"`
}
