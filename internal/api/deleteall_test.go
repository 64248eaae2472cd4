package api_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/api"
)

// goneThenFailing deletes nothing: the first instance is already gone
// (ErrNotFound), every other delete fails.
type goneThenFailing struct{ *fakeService }

func (g goneThenFailing) DeleteInstance(ctx context.Context, ref string) error {
	list, _ := g.fakeService.ListInstances(ctx)
	if len(list) > 0 && list[0].ID == ref {
		return api.ErrNotFound
	}
	return errors.New("disk on fire")
}

func seed(t *testing.T, f *fakeService) {
	t.Helper()
	ctx := context.Background()
	for _, n := range []string{"a", "b"} {
		if _, err := f.CreateInstance(ctx, api.CreateInstanceRequest{Name: n, Vcpus: 1, MemoryMiB: 64}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.CreateSnapshot(ctx, "a", api.SnapshotRequest{Name: "s"}); err != nil {
		t.Fatal(err)
	}
}

func TestDeleteAllLeavesNothing(t *testing.T) {
	f := newFakeService()
	seed(t, f)
	if err := api.DeleteAll(context.Background(), f); err != nil {
		t.Fatalf("DeleteAll: %v", err)
	}
	ins, _ := f.ListInstances(context.Background())
	snaps, _ := f.ListSnapshots(context.Background())
	if len(ins) != 0 || len(snaps) != 0 {
		t.Fatalf("after DeleteAll: %d instances, %d snapshots; want none", len(ins), len(snaps))
	}
}

func TestDeleteAllIgnoresGoneAndReportsFailures(t *testing.T) {
	f := newFakeService()
	seed(t, f)
	err := api.DeleteAll(context.Background(), goneThenFailing{f})
	if err == nil || !strings.Contains(err.Error(), "delete instance b: disk on fire") {
		t.Fatalf("DeleteAll = %v; want the failure of b reported", err)
	}
	if strings.Contains(err.Error(), "instance a") {
		t.Fatalf("DeleteAll = %v; an instance already gone is not an error", err)
	}
}
