package daemon

import (
	"context"
	"encoding/json"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/forkd/forkd/internal/api"
)

// newBackend builds the instance manager the daemon serves.
//
// Stub until the instance manager lands: every operation answers
// api.ErrNotImplemented (HTTP 501) except the lists, which are empty.
func newBackend(ctx context.Context, cfg Config, log *slog.Logger, reg prometheus.Registerer) (Backend, error) {
	return stubBackend{}, nil
}

type stubBackend struct{}

func (stubBackend) Close() error { return nil }

func (stubBackend) CreateInstance(context.Context, api.CreateInstanceRequest) (api.Instance, error) {
	return api.Instance{}, notBuilt("create instance")
}
func (stubBackend) ListInstances(context.Context) ([]api.Instance, error) {
	return []api.Instance{}, nil
}
func (stubBackend) GetInstance(_ context.Context, ref string) (api.Instance, error) {
	return api.Instance{}, notBuilt("get instance " + ref)
}
func (stubBackend) DeleteInstance(_ context.Context, ref string) error {
	return notBuilt("delete instance " + ref)
}
func (stubBackend) Action(_ context.Context, ref, action string, _ api.ActionRequest) (api.Instance, error) {
	return api.Instance{}, notBuilt(action + " " + ref)
}
func (stubBackend) ForkInstance(_ context.Context, ref string, _ api.ForkRequest) (api.Instance, error) {
	return api.Instance{}, notBuilt("fork " + ref)
}
func (stubBackend) CreateSnapshot(_ context.Context, ref string, _ api.SnapshotRequest) (api.Snapshot, error) {
	return api.Snapshot{}, notBuilt("snapshot " + ref)
}
func (stubBackend) ListSnapshots(context.Context) ([]api.Snapshot, error) {
	return []api.Snapshot{}, nil
}
func (stubBackend) GetSnapshot(_ context.Context, ref string) (api.Snapshot, error) {
	return api.Snapshot{}, notBuilt("get snapshot " + ref)
}
func (stubBackend) DeleteSnapshot(_ context.Context, ref string) error {
	return notBuilt("delete snapshot " + ref)
}
func (stubBackend) ForkSnapshot(_ context.Context, ref string, _ api.ForkRequest) (api.Instance, error) {
	return api.Instance{}, notBuilt("fork snapshot " + ref)
}
func (stubBackend) PagerStats(context.Context) (json.RawMessage, error) {
	return nil, notBuilt("pager stats")
}

func notBuilt(op string) error {
	return &api.StatusError{Status: 501, Code: api.CodeNotImplemented,
		Message: op + ": not implemented: the instance manager is not built into this forkd yet"}
}
