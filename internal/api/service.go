package api

import (
	"context"
	"encoding/json"
	"errors"
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

	CreateSnapshot(ctx context.Context, ref string, req SnapshotRequest) (Snapshot, error)
	ListSnapshots(ctx context.Context) ([]Snapshot, error)
	GetSnapshot(ctx context.Context, ref string) (Snapshot, error)
	DeleteSnapshot(ctx context.Context, ref string) error
	ForkSnapshot(ctx context.Context, ref string, req ForkRequest) (Instance, error)

	// PagerStats returns the pager's /stats JSON as is.
	PagerStats(ctx context.Context) (json.RawMessage, error)
}

// Sentinel errors. Services wrap them with %w; the handlers map them to an
// HTTP status and error code in one place (errors.go).
var (
	ErrNotFound       = errors.New("not found")               // 404 not_found
	ErrInvalidState   = errors.New("invalid state")           // 409 invalid_state
	ErrExists         = errors.New("already exists")          // 409 already_exists
	ErrAmbiguous      = errors.New("ambiguous reference")     // 409 ambiguous
	ErrInvalid        = errors.New("invalid request")         // 422 invalid_request
	ErrNotImplemented = errors.New("not implemented")         // 501 not_implemented
	ErrUnavailable    = errors.New("temporarily unavailable") // 503 unavailable
)
