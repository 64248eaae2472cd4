package api_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// fakeService is an in-memory api.Service for HTTP-layer tests only: it
// follows the lifecycle rules closely enough to produce every response shape,
// and counts calls so tests can prove a refused request never reached it.
type fakeService struct {
	mu        sync.Mutex // guards everything below
	calls     int
	seq       int
	instances map[string]*api.Instance
	snapshots map[string]*api.Snapshot
	order     []string // instance ids, creation order
	snapOrder []string
	images    map[string]*api.Image // by digest
	pulls     map[string]*api.Pull
}

func newFakeService() *fakeService {
	return &fakeService{instances: map[string]*api.Instance{}, snapshots: map[string]*api.Snapshot{},
		images: map[string]*api.Image{}, pulls: map[string]*api.Pull{}}
}

func (f *fakeService) Calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

func (f *fakeService) enter() func() {
	f.mu.Lock()
	f.calls++
	return f.mu.Unlock
}

func (f *fakeService) newID() string {
	f.seq++
	return fmt.Sprintf("%08x0000aaaa%04x", f.seq, f.seq)
}

func (f *fakeService) resolve(ref string) (*api.Instance, error) {
	if i, ok := f.instances[ref]; ok {
		return i, nil
	}
	for _, i := range f.instances {
		if i.Name == ref {
			return i, nil
		}
	}
	var found *api.Instance
	for _, i := range f.instances {
		if strings.HasPrefix(i.ID, ref) {
			if found != nil {
				return nil, fmt.Errorf("instance %q: %w", ref, api.ErrAmbiguous)
			}
			found = i
		}
	}
	if found == nil {
		return nil, fmt.Errorf("instance %q: %w", ref, api.ErrNotFound)
	}
	return found, nil
}

func (f *fakeService) nameTaken(name string) bool {
	for _, i := range f.instances {
		if i.Name == name {
			return true
		}
	}
	return false
}

func (f *fakeService) CreateInstance(ctx context.Context, req api.CreateInstanceRequest) (api.Instance, error) {
	defer f.enter()()
	if f.nameTaken(req.Name) {
		return api.Instance{}, fmt.Errorf("create %q: %w", req.Name, api.ErrExists)
	}
	state := api.StateRunning
	if req.Start != nil && !*req.Start {
		state = api.StateCreated
	}
	inst := &api.Instance{
		ID: f.newID(), Name: req.Name, State: state, Vcpus: req.Vcpus, MemoryMiB: req.MemoryMiB,
		Kernel: req.Kernel, BootArgs: req.BootArgs, CreatedAt: time.Now().UTC(),
		MemoryCheck: "ok", RestoreBackend: api.BackendFile, HugePages: req.HugePages, Pid: 4242,
	}
	if req.Image != "" {
		im, err := f.resolveImage(req.Image)
		if err != nil {
			return api.Instance{}, err
		}
		inst.Image = im.Digest
	}
	if state == api.StateRunning {
		inst.Vsock = &api.Vsock{CID: 3, UDSPath: "/var/lib/forkd/guests/" + inst.ID + "/v.sock"}
	}
	f.instances[inst.ID] = inst
	f.order = append(f.order, inst.ID)
	return *inst, nil
}

func (f *fakeService) ListInstances(ctx context.Context) ([]api.Instance, error) {
	defer f.enter()()
	var out []api.Instance
	for _, id := range f.order {
		if i, ok := f.instances[id]; ok {
			out = append(out, *i)
		}
	}
	return out, nil
}

func (f *fakeService) GetInstance(ctx context.Context, ref string) (api.Instance, error) {
	defer f.enter()()
	i, err := f.resolve(ref)
	if err != nil {
		return api.Instance{}, err
	}
	return *i, nil
}

func (f *fakeService) DeleteInstance(ctx context.Context, ref string) error {
	defer f.enter()()
	i, err := f.resolve(ref)
	if err != nil {
		return err
	}
	delete(f.instances, i.ID)
	return nil
}

func (f *fakeService) Action(ctx context.Context, ref, action string, req api.ActionRequest) (api.Instance, error) {
	defer f.enter()()
	i, err := f.resolve(ref)
	if err != nil {
		return api.Instance{}, err
	}
	from := map[string][]string{
		"start":   {api.StateCreated, api.StateStopped},
		"pause":   {api.StateRunning},
		"resume":  {api.StatePaused},
		"standby": {api.StateRunning, api.StatePaused},
		"restore": {api.StateStandby},
		"stop":    {api.StateRunning, api.StatePaused, api.StateStandby},
	}[action]
	to := map[string]string{
		"start": api.StateRunning, "pause": api.StatePaused, "resume": api.StateRunning,
		"standby": api.StateStandby, "restore": api.StateRunning, "stop": api.StateStopped,
	}[action]
	ok := false
	for _, s := range from {
		ok = ok || s == i.State
	}
	if !ok {
		return api.Instance{}, fmt.Errorf("%s %s: instance is %s: %w", action, i.Name, i.State, api.ErrInvalidState)
	}
	i.State = to
	if action == "standby" {
		i.SnapshotCacheKey = "ck-" + i.ID
		i.Pid = 0
	}
	if action == "restore" && req.RestoreBackend != "" {
		i.RestoreBackend = req.RestoreBackend
	}
	if action == "restore" {
		// What a replaying restore reports, so the spec check sees it.
		i.Prefetch = &api.Prefetch{Mode: "replay", PagesRecorded: 100, PagesPrefetched: 96, PagesWasted: 3, WorkingSetMs: 12, Done: true}
	}
	return *i, nil
}

func (f *fakeService) fork(name, source, cacheKey, state string, mem, vcpus int) (api.Instance, error) {
	if f.nameTaken(name) {
		return api.Instance{}, fmt.Errorf("fork %q: %w", name, api.ErrExists)
	}
	inst := &api.Instance{
		ID: f.newID(), Name: name, State: state, Vcpus: vcpus, MemoryMiB: mem, CreatedAt: time.Now().UTC(),
		Source: source, SnapshotCacheKey: cacheKey, MemoryCheck: "ok", ForkMode: api.ForkModeHardlink,
		RestoreBackend: api.BackendFile, HugePages: api.HugePagesNone,
	}
	f.instances[inst.ID] = inst
	f.order = append(f.order, inst.ID)
	return *inst, nil
}

func (f *fakeService) ForkInstance(ctx context.Context, ref string, req api.ForkRequest) (api.Instance, error) {
	defer f.enter()()
	src, err := f.resolve(ref)
	if err != nil {
		return api.Instance{}, err
	}
	if src.State != api.StateStandby && !(req.FromRunning && src.State == api.StateRunning) {
		return api.Instance{}, fmt.Errorf("fork %s: instance is %s: %w", src.Name, src.State, api.ErrInvalidState)
	}
	state := req.TargetState
	if state == "" {
		state = src.State
	}
	return f.fork(req.Name, "instance:"+src.ID, src.SnapshotCacheKey, state, src.MemoryMiB, src.Vcpus)
}

// forkBatch makes every fork of names or, when any name is taken, none.
func (f *fakeService) forkBatch(names []string, source, cacheKey, state string, mem, vcpus int) ([]api.Instance, error) {
	for _, n := range names {
		if f.nameTaken(n) {
			return nil, fmt.Errorf("a batch of %d forks: fork %q: %w (no fork of the batch kept)", len(names), n, api.ErrExists)
		}
	}
	out := make([]api.Instance, len(names))
	for i, n := range names {
		inst, err := f.fork(n, source, cacheKey, state, mem, vcpus)
		if err != nil {
			return nil, err // cannot happen: every name was free
		}
		out[i] = inst
	}
	return out, nil
}

func (f *fakeService) ForkInstanceBatch(ctx context.Context, ref string, req api.ForkBatchRequest) ([]api.Instance, error) {
	defer f.enter()()
	src, err := f.resolve(ref)
	if err != nil {
		return nil, err
	}
	if src.State != api.StateStandby {
		return nil, fmt.Errorf("a batch of forks of %s: instance is %s: %w", src.Name, src.State, api.ErrInvalidState)
	}
	state := req.TargetState
	if state == "" {
		state = src.State
	}
	return f.forkBatch(req.Names(), "instance:"+src.ID, src.SnapshotCacheKey, state, src.MemoryMiB, src.Vcpus)
}

func (f *fakeService) CreateSnapshot(ctx context.Context, ref string, req api.SnapshotRequest) (api.Snapshot, error) {
	defer f.enter()()
	src, err := f.resolve(ref)
	if err != nil {
		return api.Snapshot{}, err
	}
	comp := req.Compression
	if comp == "" {
		comp = "none"
	}
	s := &api.Snapshot{
		ID: f.newID(), Name: req.Name, SourceInstance: src.ID, CreatedAt: time.Now().UTC(),
		SizeBytes: int64(src.MemoryMiB) << 20, Compression: comp, State: "ready",
		SnapshotCacheKey: "ck-snap-" + src.ID, MemoryMiB: src.MemoryMiB, Vcpus: src.Vcpus, HugePages: src.HugePages,
	}
	f.snapshots[s.ID] = s
	f.snapOrder = append(f.snapOrder, s.ID)
	return *s, nil
}

func (f *fakeService) resolveSnap(ref string) (*api.Snapshot, error) {
	for _, s := range f.snapshots {
		if s.ID == ref || s.Name == ref || strings.HasPrefix(s.ID, ref) {
			return s, nil
		}
	}
	return nil, fmt.Errorf("snapshot %q: %w", ref, api.ErrNotFound)
}

func (f *fakeService) ListSnapshots(ctx context.Context) ([]api.Snapshot, error) {
	defer f.enter()()
	var out []api.Snapshot
	for _, id := range f.snapOrder {
		if s, ok := f.snapshots[id]; ok {
			out = append(out, *s)
		}
	}
	return out, nil
}

func (f *fakeService) GetSnapshot(ctx context.Context, ref string) (api.Snapshot, error) {
	defer f.enter()()
	s, err := f.resolveSnap(ref)
	if err != nil {
		return api.Snapshot{}, err
	}
	return *s, nil
}

func (f *fakeService) DeleteSnapshot(ctx context.Context, ref string) error {
	defer f.enter()()
	s, err := f.resolveSnap(ref)
	if err != nil {
		return err
	}
	delete(f.snapshots, s.ID)
	return nil
}

func (f *fakeService) ForkSnapshot(ctx context.Context, ref string, req api.ForkRequest) (api.Instance, error) {
	defer f.enter()()
	s, err := f.resolveSnap(ref)
	if err != nil {
		return api.Instance{}, err
	}
	state := req.TargetState
	if state == "" {
		state = api.StateStandby
	}
	return f.fork(req.Name, "snapshot:"+s.ID, s.SnapshotCacheKey, state, s.MemoryMiB, s.Vcpus)
}

func (f *fakeService) ForkSnapshotBatch(ctx context.Context, ref string, req api.ForkBatchRequest) ([]api.Instance, error) {
	defer f.enter()()
	s, err := f.resolveSnap(ref)
	if err != nil {
		return nil, err
	}
	state := req.TargetState
	if state == "" {
		state = api.StateStandby
	}
	return f.forkBatch(req.Names(), "snapshot:"+s.ID, s.SnapshotCacheKey, state, s.MemoryMiB, s.Vcpus)
}

func (f *fakeService) PagerStats(ctx context.Context) (json.RawMessage, error) {
	defer f.enter()()
	return json.RawMessage(`{"hits":10,"misses":1,"sessions":[]}`), nil
}

// Events streams what the fake holds now, one instance.created or
// snapshot.created per item, then ends the stream (closes the channel).
func (f *fakeService) Events(ctx context.Context) (<-chan api.Event, error) {
	defer f.enter()()
	var evs []api.Event
	for _, id := range f.order {
		in := f.instances[id]
		if in == nil {
			continue
		}
		evs = append(evs, api.Event{Time: time.Now().UTC(), Type: api.EventInstanceCreated,
			Instance: &api.EventRef{ID: in.ID, Name: in.Name}, State: in.State})
	}
	for _, id := range f.snapOrder {
		sn := f.snapshots[id]
		if sn == nil {
			continue
		}
		evs = append(evs, api.Event{Time: time.Now().UTC(), Type: api.EventSnapshotCreated,
			Snapshot: &api.EventRef{ID: sn.ID, Name: sn.Name}, State: sn.State})
	}
	ch := make(chan api.Event, len(evs))
	for _, ev := range evs {
		ch <- ev
	}
	close(ch)
	return ch, nil
}
