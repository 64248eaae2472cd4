package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
)

// Service is what the HTTP handlers need from the instance manager. It is
// declared here, at its consumer; the instance manager implements it.
// Refs are resolved by exact id, then name, then unique id prefix.
type Service interface {
	CreateInstance(ctx context.Context, req CreateInstanceRequest) (Instance, error)
	ListInstances(ctx context.Context) ([]Instance, error)
	GetInstance(ctx context.Context, ref string) (Instance, error)
	DeleteInstance(ctx context.Context, ref string) error
	// Action runs one lifecycle action: start|pause|resume|standby|restore|stop.
	Action(ctx context.Context, ref, action string, req ActionRequest) (Instance, error)
	ForkInstance(ctx context.Context, ref string, req ForkRequest) (Instance, error)
	// ForkInstanceBatch makes req.Count forks of one source at once: all
	// of them, in name order, or an error and none.
	ForkInstanceBatch(ctx context.Context, ref string, req ForkBatchRequest) ([]Instance, error)

	CreateSnapshot(ctx context.Context, ref string, req SnapshotRequest) (Snapshot, error)
	ListSnapshots(ctx context.Context) ([]Snapshot, error)
	GetSnapshot(ctx context.Context, ref string) (Snapshot, error)
	DeleteSnapshot(ctx context.Context, ref string) error
	ForkSnapshot(ctx context.Context, ref string, req ForkRequest) (Instance, error)
	// ForkSnapshotBatch is ForkInstanceBatch for a snapshot.
	ForkSnapshotBatch(ctx context.Context, ref string, req ForkBatchRequest) ([]Instance, error)

	// PagerStats returns the pager's /stats JSON as is.
	PagerStats(ctx context.Context) (json.RawMessage, error)

	// Events subscribes to what happens from now on. The channel closes
	// when ctx ends, or early when the subscriber falls too far behind
	// (events are never queued without bound); either way the caller
	// simply stops reading.
	Events(ctx context.Context) (<-chan Event, error)

	ImageService
}

// ImageService is the images part of Service. Image refs are a reference
// (as pulled), a digest or a unique digest prefix.
type ImageService interface {
	// StartPull starts pulling an image and returns at once; GetPull
	// reports how it goes.
	StartPull(ctx context.Context, req PullRequest) (Pull, error)
	GetPull(ctx context.Context, id string) (Pull, error)
	ListImages(ctx context.Context) ([]Image, error)
	GetImage(ctx context.Context, ref string) (Image, error)
	// DeleteImage refuses (ErrInvalidState) an image an instance or
	// snapshot uses.
	DeleteImage(ctx context.Context, ref string) error
	// GCImages deletes every image no instance or snapshot uses.
	GCImages(ctx context.Context) (ImageGC, error)
}

// Sentinel errors. Services wrap them with %w; the handlers map them to an
// HTTP status and error code in one place (errors.go).
var (
	ErrNotFound      = errors.New("not found")               // 404 not_found
	ErrInvalidState  = errors.New("invalid state")           // 409 invalid_state
	ErrExists        = errors.New("already exists")          // 409 already_exists
	ErrAmbiguous     = errors.New("ambiguous reference")     // 409 ambiguous_reference
	ErrInvalid       = errors.New("invalid request")         // 422 invalid_request
	ErrUnavailable   = errors.New("temporarily unavailable") // 503 unavailable
	ErrPoolExhausted = errors.New("address pool exhausted")  // 409 address_pool_exhausted
	ErrPortInUse     = errors.New("host port in use")        // 409 port_in_use
	ErrNoSpace       = errors.New("no space left")           // 507 insufficient_storage
	ErrShuttingDown  = errors.New("daemon shutting down")    // 503 shutting_down
	ErrBusy          = errors.New("busy")                    // 429 busy
	// ErrInsufficientResources: the host cannot hold what the request asks
	// (memory, vCPUs, running VMs, disk); the message says which and by how
	// much. 409 insufficient_resources.
	ErrInsufficientResources = errors.New("insufficient resources")
	// ErrJailUIDsExhausted: a VMM needs a uid of its own and every uid of
	// jail_uid_range is held by a running VMM. 409 jail_uids_exhausted.
	ErrJailUIDsExhausted = errors.New("jail uids exhausted")
)

// DeleteAll deletes every instance and every snapshot s knows, as tools that
// own a whole data dir do before they stop its daemon (deleting is what
// stops VMMs, which outlive the daemon). An id already gone is not an error;
// the other failures are joined.
func DeleteAll(ctx context.Context, s Service) error {
	var errs []error
	if list, err := s.ListInstances(ctx); err != nil {
		errs = append(errs, fmt.Errorf("list instances: %w", err))
	} else {
		for _, in := range list {
			if err := s.DeleteInstance(ctx, in.ID); err != nil && !errors.Is(err, ErrNotFound) {
				errs = append(errs, fmt.Errorf("delete instance %s: %w", in.Name, err))
			}
		}
	}
	if list, err := s.ListSnapshots(ctx); err != nil {
		errs = append(errs, fmt.Errorf("list snapshots: %w", err))
	} else {
		for _, sn := range list {
			if err := s.DeleteSnapshot(ctx, sn.ID); err != nil && !errors.Is(err, ErrNotFound) {
				errs = append(errs, fmt.Errorf("delete snapshot %s: %w", sn.Name, err))
			}
		}
	}
	return errors.Join(errs...)
}
