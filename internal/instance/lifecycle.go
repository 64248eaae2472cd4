package instance

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/forkd/forkd/internal/capacity"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/hostpath"
	rootfsimg "github.com/forkd/forkd/internal/rootfs"
	"github.com/forkd/forkd/internal/store"
)

const (
	defaultVcpus     = 1
	defaultMemoryMiB = 256
	maxVcpus         = 32
	// placeholderRootfsBytes is the apparent size of the sparse rootfs made
	// for an emulator instance created without one.
	placeholderRootfsBytes = 256 << 20
	// defaultFirecrackerBootArgs is used for real Firecracker when the
	// request gives none.
	defaultFirecrackerBootArgs = "console=ttyS0 reboot=k panic=1 pci=off"
)

// placeholderKernel is the kernel file of emulator instances created without
// one: the emulator accepts any existing file and never executes it.
var placeholderKernel = []byte("forkd placeholder kernel: the emulator (forkd vmm) does not execute it\n")

func (m *Manager) guest(id string) (guestdir.Guest, error) {
	g, err := m.layout.Guest(id)
	if err != nil {
		return guestdir.Guest{}, fmt.Errorf("%w: %v", api.ErrInvalid, err)
	}
	return g, nil
}

// kernelPath is the kernel an instance boots: the guest dir's own copy (a
// clone of the user's, taken at create from the handle that was checked, or
// the emulator's placeholder), else, for an instance created before kernels
// were copied, its user-given path.
func kernelPath(in store.Instance, g guestdir.Guest) string {
	if _, err := os.Lstat(g.Kernel()); err == nil || in.Kernel == "" {
		return g.Kernel()
	}
	return in.Kernel
}

// CreateInstance makes an instance's directory and record and, unless
// req.Start is false, boots it.
func (m *Manager) CreateInstance(ctx context.Context, req api.CreateInstanceRequest) (api.Instance, error) {
	start := time.Now()
	defer m.observe("create", start)
	defer m.netOpStart()()
	ctx = context.WithoutCancel(ctx)
	id := newID()
	if req.Name == "" {
		req.Name = id // an unnamed instance is named by its own id
	} else if err := validName("instance", req.Name); err != nil {
		return api.Instance{}, err
	}
	if req.Vcpus == 0 {
		req.Vcpus = defaultVcpus
	}
	if req.MemoryMiB == 0 {
		req.MemoryMiB = defaultMemoryMiB
	}
	if req.Vcpus < 1 || req.Vcpus > maxVcpus || req.MemoryMiB < 1 {
		return api.Instance{}, fmt.Errorf("%w: vcpus %d (1-%d), memory_mib %d (>0)", api.ErrInvalid, req.Vcpus, maxVcpus, req.MemoryMiB)
	}
	if req.Image != "" && req.Rootfs != "" {
		return api.Instance{}, fmt.Errorf("%w: give either image or rootfs, not both", api.ErrInvalid)
	}
	if req.DiskSizeMiB != 0 && req.Image == "" {
		return api.Instance{}, fmt.Errorf("%w: disk_size_mib needs an image", api.ErrInvalid)
	}
	if !m.cfg.VMM.Emulator && ((req.Kernel == "" && m.cfg.Kernel == "") || (req.Rootfs == "" && req.Image == "")) {
		return api.Instance{}, fmt.Errorf("%w: a kernel (the request's, or the daemon's kernel setting) and a rootfs or image are required with firecracker (%s)", api.ErrInvalid, m.cfg.VMM.Binary)
	}
	// Each host file is opened once, checked on its handle and cloned from
	// it (hostpath): naming a file must never read one the caller may not,
	// and nothing may swap it between the check and the copy.
	var kernel, rootfs *os.File
	for _, h := range []struct {
		what string
		path *string
		f    **os.File
	}{{"kernel", &req.Kernel, &kernel}, {"rootfs", &req.Rootfs, &rootfs}} {
		if *h.path == "" {
			continue
		}
		f, err := m.hostFiles().Open(h.what, *h.path, api.IsRemote(ctx))
		if err != nil {
			if errors.Is(err, hostpath.ErrRefused) {
				err = fmt.Errorf("%w: %v", api.ErrInvalid, err)
			}
			return api.Instance{}, err
		}
		defer f.Close()
		*h.f, *h.path = f, f.Name()
	}
	if kernel == nil && m.cfg.Kernel != "" {
		// The daemon's kernel setting: the operator's file, checked the
		// same way, but not confined to host_path_dirs (no client named it).
		f, err := m.hostFiles().Open("kernel", m.cfg.Kernel, false)
		if err != nil {
			return api.Instance{}, fmt.Errorf("the daemon's kernel setting: %w", err)
		}
		defer f.Close()
		kernel, req.Kernel = f, f.Name()
	}
	g, err := m.guest(id)
	if err != nil {
		return api.Instance{}, err
	}
	// An image's disk is admitted by the image store (its headroom); a
	// rootfs the client named costs its copy here.
	var diskCost int64
	if rootfs != nil {
		diskCost = m.copyCost(rootfs.Name())
	}
	release, err := m.reserveCapacity(ctx, "create", capacity.Request{ID: id, MemoryMiB: req.MemoryMiB, Vcpus: req.Vcpus,
		Runs: req.Start == nil || *req.Start, DiskBytes: diskCost, HugePages: req.HugePages == api.HugePages2M, Boots: true})
	if err != nil {
		return api.Instance{}, err
	}
	defer release()
	if req.BootArgs == "" && !m.cfg.VMM.Emulator {
		req.BootArgs = defaultFirecrackerBootArgs
	}
	networked, pubs, err := m.wantNetwork(req.Network, req.Publish)
	if err != nil {
		return api.Instance{}, err
	}
	// The record is hidden (stateCreating) until the files are complete: a
	// create is never listed half-made.
	rec := store.Instance{
		ID: id, Name: req.Name, State: stateCreating, Vcpus: req.Vcpus, MemoryMiB: req.MemoryMiB,
		Kernel: req.Kernel, Rootfs: req.Rootfs, BootArgs: req.BootArgs, CreatedAt: time.Now().UTC(),
		MemoryCheck: "unknown", Networked: networked,
	}
	if req.HugePages == api.HugePages2M {
		rec.HugePages = api.HugePages2M
	}
	rec.RestoreBackend, _ = restoreBackend(rec, "", m.cfg.RestoreBackend)
	if networked {
		// The guest's identity, fixed for the life of this VM and its forks.
		nc := m.net().Config()
		rec.NetGuest, rec.NetMAC = nc.Guest.String(), nc.GuestMAC.String()
		rec.BootArgs = withBootIP(rec.BootArgs, nc.BootIP())
	}
	var disk imageDisk
	var releaseOnce sync.Once
	releaseImage := func() {}
	defer releaseOnce.Do(func() { releaseImage() })
	if req.Image != "" {
		// Pull (if missing) before anything is journalled: a bad image
		// leaves nothing behind. The image stays held until the record
		// naming it is durable, so no delete can slip in between.
		im, release, err := m.acquireImage(ctx, req.Image, req.DiskSizeMiB)
		if err != nil {
			return api.Instance{}, fmt.Errorf("create instance %q: %w", req.Name, err)
		}
		releaseImage = release
		rec.Image = im.Digest
		disk.rootfs, _ = m.images.Rootfs(im.Digest)
		disk.size = int64(req.DiskSizeMiB) << 20
	}
	o, err := m.begin(ctx, "create", id, opPayload{})
	if err != nil {
		return api.Instance{}, err
	}
	if err := m.createRecord(ctx, &rec, pubs); err != nil {
		o.finish(ctx, err)
		return api.Instance{}, err
	}
	err = m.setupNetwork(ctx, o, rec, pubs)
	if err == nil {
		err = m.makeGuestFiles(ctx, kernel, rootfs, disk, g)
	}
	if err == nil {
		rec.State = api.StateCreated
		err = m.db.UpdateInstance(ctx, rec)
	}
	if err == nil {
		err = o.step(ctx, "files", nil)
	}
	releaseOnce.Do(func() { releaseImage() }) // the record naming the image is durable, or gone
	if err != nil {
		u := m.undo("create", id)
		u.do("remove the partial instance", m.removePartial(ctx, id))
		err = u.join(fmt.Errorf("create instance %q: %w", req.Name, imageErr(err)))
		o.finish(ctx, err)
		return api.Instance{}, err
	}
	o.finish(ctx, nil)
	m.log.Info("instance created", "instance", id, "name", req.Name, "vcpus", req.Vcpus, "memory_mib", req.MemoryMiB)
	if req.Start != nil && !*req.Start {
		return m.toAPI(ctx, rec), nil
	}
	return m.Action(ctx, id, "start", api.ActionRequest{})
}

// stateCreating is the record of an instance whose create has not finished:
// never listed or resolved, and removed by the reconciler if the create's
// journal entry did not reach "files".
const stateCreating = "Creating"

// hostFiles is the policy for host files clients name (kernel, rootfs).
func (m *Manager) hostFiles() hostpath.Policy {
	return hostpath.Policy{DataDir: m.layout.Root(), Allowed: m.cfg.HostPathDirs}
}

// imageDisk is an image's ext4 a new instance's disk is cloned from.
type imageDisk struct {
	rootfs string // the image's rootfs.ext4 (held by the caller); "" for none
	size   int64  // grow the clone to this many bytes; 0 keeps the image's size
}

// makeGuestFiles creates the guest dir with its kernel and a private
// rootfs: clones (reflink-first) of the user's files, read through the
// handles the caller opened and checked, or of an image's ext4 grown to
// img.size (reflink-first, so a second VM of an image costs no data I/O on
// XFS), else a placeholder kernel and a sparse placeholder disk.
func (m *Manager) makeGuestFiles(ctx context.Context, kernel, rootfs *os.File, img imageDisk, g guestdir.Guest) error {
	if err := os.Mkdir(g.Jail, 0o700); err != nil {
		return err
	}
	if err := os.Mkdir(g.Dir, 0o755); err != nil {
		return err
	}
	if kernel != nil {
		if _, err := m.files.CloneFile(kernel, g.Kernel()); err != nil {
			return err
		}
	} else if err := atomicfile.WriteFile(g.Kernel(), placeholderKernel, sealMode); err != nil {
		return err
	}
	// Forks and the store link the kernel: sealed (inodes.go).
	if err := sealPath(g.Kernel()); err != nil {
		return err
	}
	switch {
	case rootfs != nil:
		if _, err := m.files.CloneFile(rootfs, g.Rootfs()); err != nil {
			return err
		}
	case img.rootfs != "":
		if _, err := m.files.Clone(img.rootfs, g.Rootfs()); err != nil {
			return err
		}
		if img.size > 0 {
			if err := rootfsimg.Grow(ctx, g.Rootfs(), img.size); err != nil {
				return err
			}
		}
	default:
		f, err := os.OpenFile(g.Rootfs(), os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o644)
		if err != nil {
			return err
		}
		if err := f.Truncate(placeholderRootfsBytes); err != nil {
			f.Close()
			return err
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
	}
	// The disk is this VM's alone: given to its VMM's uid at each launch.
	if err := os.Chmod(g.Rootfs(), 0o600); err != nil {
		return err
	}
	return syncDirs(g.Dir, g.Jail, filepath.Dir(g.Jail))
}

// ListInstances returns every instance.
func (m *Manager) ListInstances(ctx context.Context) ([]api.Instance, error) {
	all, err := m.db.ListInstances(ctx)
	if err != nil {
		return nil, err
	}
	pubs, err := m.db.Publishes(ctx) // one query for the whole list
	if err != nil {
		return nil, err
	}
	out := make([]api.Instance, 0, len(all))
	for _, in := range all {
		if in.State == stateCreating {
			continue // not listed until its create has finished
		}
		out = append(out, m.toAPIWith(in, pubs[in.ID]))
	}
	return out, nil
}

// GetInstance returns one instance. It takes no lock: while an operation
// runs, the instance shows that operation's transient state.
func (m *Manager) GetInstance(ctx context.Context, ref string) (api.Instance, error) {
	in, err := m.resolveInstance(ctx, ref)
	if err != nil {
		return api.Instance{}, apiErr(err)
	}
	return m.toAPI(ctx, in), nil
}

// toAPI renders a record for a client. It does no I/O to a VMM or the
// pager: a live instance's memory check is the one its supervisor last read
// in the background.
func (m *Manager) toAPI(ctx context.Context, in store.Instance) api.Instance {
	var pubs []store.Publish
	if in.Networked {
		pubs, _ = m.db.InstancePublishes(ctx, in.ID)
	}
	return m.toAPIWith(in, pubs)
}

func (m *Manager) toAPIWith(in store.Instance, pubs []store.Publish) api.Instance {
	check := in.MemoryCheck
	if oneOf(in.State, api.StateRunning, api.StatePaused) {
		if f := m.factsOf(in.ID); f.memoryCheck != "" {
			check = f.memoryCheck
		}
	}
	if check == "" {
		check = "unknown"
	}
	// Only a Stopped instance (why its VMM stopped) or one in Error (what
	// failed) carries an error; a record from before that rule may still
	// hold one in another state.
	errText := in.Error
	if !oneOf(in.State, api.StateStopped, api.StateError) {
		errText = ""
	}
	netw, publish := m.networkAPI(in, pubs)
	return api.Instance{
		ID: in.ID, Name: in.Name, State: in.State, Vcpus: in.Vcpus, MemoryMiB: in.MemoryMiB,
		Kernel: in.Kernel, Rootfs: in.Rootfs, BootArgs: in.BootArgs, CreatedAt: in.CreatedAt,
		Source: in.Source, SnapshotCacheKey: in.SnapshotCacheKey, MemoryCheck: check,
		ForkMode: in.ForkMode, RestoreBackend: in.RestoreBackend, HugePages: hugePagesAPI(in.HugePages),
		Pid: in.Pid, Error: errText,
		Network: netw, Publish: publish,
		Image:    in.Image,
		Prefetch: m.prefetchStats(in.ID),
		Vsock:    m.vsockAPI(in),
	}
}

// Action runs one lifecycle action.
func (m *Manager) Action(ctx context.Context, ref, action string, req api.ActionRequest) (api.Instance, error) {
	ctx = context.WithoutCancel(ctx)
	var fn func(context.Context, *store.Instance, api.ActionRequest) error
	switch action {
	case "start":
		fn = m.start
	case "pause":
		fn = m.pause
	case "resume":
		fn = m.resume
	case "standby":
		fn = m.standby
	case "restore":
		fn = m.restoreAction
	case "stop":
		fn = m.stop
	default:
		return api.Instance{}, fmt.Errorf("%w: unknown action %q (start|pause|resume|standby|restore|stop)", api.ErrInvalid, action)
	}
	start := time.Now()
	defer m.observe(action, start)
	if destructive(action) {
		probe, err := m.resolveInstanceFor(ctx, ref, action)
		if err != nil {
			return api.Instance{}, apiErr(err)
		}
		ref = probe.ID
	}
	in, unlock, err := m.lockInstance(ctx, ref, true)
	if err != nil {
		return api.Instance{}, err
	}
	defer unlock()
	if err := fn(ctx, &in, req); err != nil {
		if !refused(err) { // a failure, not a refusal: say so on GET /events too
			m.failed(in.ID, in.Name, in.State, err.Error())
		}
		return api.Instance{}, err
	}
	return m.toAPI(ctx, in), nil
}

// refused reports whether err refuses a request (bad input, wrong state)
// rather than reports an operation that failed.
func refused(err error) bool {
	return errors.Is(err, api.ErrInvalid) || errors.Is(err, api.ErrInvalidState) || errors.Is(err, api.ErrNotFound) ||
		errors.Is(err, api.ErrAmbiguous) || errors.Is(err, api.ErrExists)
}

// start boots a Created or Stopped instance. Caller holds the write lock.
func (m *Manager) start(ctx context.Context, in *store.Instance, _ api.ActionRequest) error {
	if !oneOf(in.State, api.StateCreated, api.StateStopped) {
		return invalidState(*in, "start", api.StateCreated, api.StateStopped)
	}
	g, err := m.guest(in.ID)
	if err != nil {
		return err
	}
	release, err := m.reserveRunning(ctx, "start", *in)
	if err != nil {
		return err
	}
	defer release()
	o, err := m.begin(ctx, "start", in.ID, opPayload{Prev: in.State})
	if err != nil {
		return err
	}
	prev := *in
	p, err := m.boot(ctx, *in, g)
	if err == nil {
		err = o.step(ctx, "booted", &opPayload{Prev: in.State, Pid: p.Pid})
	}
	if err == nil {
		in.State, in.Pid, in.Error, in.MemoryCheck, in.VsockCID = api.StateRunning, p.Pid, "", "ok", guestCID
		if err = m.fault("start:record"); err == nil {
			err = m.db.UpdateInstance(ctx, *in)
		}
	}
	if err != nil {
		// Never leave a VMM running under a record that does not say so.
		u := m.undo("start", in.ID)
		if p != nil {
			err = m.withDeathCause(in.ID, p, err)
			u.do("kill the VMM", m.killVMM(ctx, in.ID, p.Pid, g))
		}
		*in = prev
		err = u.join(fmt.Errorf("start %s: %w", in.Name, err))
		o.finish(ctx, err)
		return err
	}
	o.finish(ctx, nil)
	m.supervise(*in, p, false)
	m.log.Info("instance started", "instance", in.ID, "pid", p.Pid)
	return nil
}

// boot launches a VMM and boots the instance with dirty-page tracking on,
// so its first snapshot can be Full and every later one a Diff.
func (m *Manager) boot(ctx context.Context, in store.Instance, g guestdir.Guest) (*firecracker.Process, error) {
	if err := m.prepareTAP(in); err != nil {
		return nil, err
	}
	p, err := m.launch(ctx, in, g)
	if err != nil {
		return nil, err
	}
	c := m.client(g)
	defer c.Close()
	steps := []func() error{
		func() error {
			mc := firecracker.MachineConfig{VcpuCount: in.Vcpus, MemSizeMib: in.MemoryMiB, TrackDirtyPages: true}
			if in.HugePages == api.HugePages2M {
				mc.HugePages = firecracker.HugePages2M
			}
			return c.PutMachineConfig(ctx, mc)
		},
		func() error {
			return c.PutBootSource(ctx, firecracker.BootSource{KernelImagePath: g.InVMM(kernelPath(in, g)), BootArgs: in.BootArgs})
		},
		func() error {
			return c.PutDrive(ctx, firecracker.Drive{DriveID: "rootfs", PathOnHost: g.RootfsRel(), IsRootDevice: true})
		},
		func() error {
			if !in.Networked {
				return nil
			}
			return c.PutNetworkInterface(ctx, netInterface(in))
		},
		func() error {
			// Relative to the VMM's working directory, the guest dir: the
			// vmstate records it so, and each fork's VMM binds its own.
			return c.PutVsock(ctx, firecracker.Vsock{GuestCID: guestCID, UDSPath: g.VsockRel()})
		},
		func() error { return c.StartInstance(ctx) },
		func() error { return m.activateTAP(in) },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return p, err
		}
	}
	return p, nil
}

func (m *Manager) pause(ctx context.Context, in *store.Instance, _ api.ActionRequest) error {
	if in.State != api.StateRunning {
		return invalidState(*in, "pause", api.StateRunning)
	}
	g, err := m.guest(in.ID)
	if err != nil {
		return err
	}
	c := m.client(g)
	defer c.Close()
	if err := c.Pause(ctx); err != nil {
		return fmt.Errorf("pause %s: %w", in.Name, err)
	}
	in.State = api.StatePaused
	return m.db.UpdateInstance(ctx, *in)
}

func (m *Manager) resume(ctx context.Context, in *store.Instance, _ api.ActionRequest) error {
	if in.State != api.StatePaused {
		return invalidState(*in, "resume", api.StatePaused)
	}
	g, err := m.guest(in.ID)
	if err != nil {
		return err
	}
	c := m.client(g)
	defer c.Close()
	if err := c.Resume(ctx); err != nil {
		return fmt.Errorf("resume %s: %w", in.Name, err)
	}
	in.State = api.StateRunning
	return m.db.UpdateInstance(ctx, *in)
}

// stop kills the VMM and drops the instance's memory (snapshot-latest and
// snapshot-base); the disk stays, and start boots it afresh.
func (m *Manager) stop(ctx context.Context, in *store.Instance, _ api.ActionRequest) error {
	if !oneOf(in.State, api.StateRunning, api.StatePaused, api.StateStandby, api.StateError) {
		return invalidState(*in, "stop", api.StateRunning, api.StatePaused, api.StateStandby)
	}
	o, err := m.begin(ctx, "stop", in.ID, opPayload{Prev: in.State})
	if err != nil {
		return err
	}
	err = m.finishStop(ctx, in)
	o.finish(ctx, err)
	return err
}

// finishStop is stop's body; the reconciler re-runs it after a crash (every
// step is idempotent).
func (m *Manager) finishStop(ctx context.Context, in *store.Instance) error {
	g, err := m.guest(in.ID)
	if err != nil {
		return err
	}
	if in.State != api.StateStandby {
		if in.State == api.StateRunning || in.State == api.StatePaused {
			in.MemoryCheck = m.memoryCheck(ctx, g)
		}
	}
	if err := m.killVMM(ctx, in.ID, in.Pid, g); err != nil {
		return fmt.Errorf("stop %s: %w", in.Name, err)
	}
	m.closeSession(ctx, in)
	if err := os.RemoveAll(g.SnapshotsDir()); err != nil {
		return fmt.Errorf("stop %s: %w", in.Name, err)
	}
	in.State, in.Pid, in.SnapshotCacheKey, in.Error = api.StateStopped, 0, "", ""
	if err := m.db.UpdateInstance(ctx, *in); err != nil {
		return err
	}
	m.forgetPrefetch(in.ID)
	m.log.Info("instance stopped", "instance", in.ID)
	return nil
}

// DeleteInstance removes an instance in any state. Forks of it are not
// affected: they hold their own links to every inode they share.
func (m *Manager) DeleteInstance(ctx context.Context, ref string) error {
	start := time.Now()
	defer m.observe("delete", start)
	ctx = context.WithoutCancel(ctx)
	probe, err := m.resolveInstanceFor(ctx, ref, "delete")
	if err != nil {
		return apiErr(err)
	}
	in, unlock, err := m.lockResolved(ctx, probe, true)
	if err != nil {
		return err
	}
	defer unlock()
	o, err := m.begin(ctx, "delete", in.ID, opPayload{})
	if err != nil {
		return err
	}
	err = m.finishDelete(ctx, in)
	o.finish(ctx, err)
	return err
}

// finishDelete is delete's body; the reconciler re-runs it after a crash.
func (m *Manager) finishDelete(ctx context.Context, in store.Instance) error {
	g, err := m.guest(in.ID)
	if err != nil {
		return err
	}
	if err := m.killVMM(ctx, in.ID, in.Pid, g); err != nil {
		return fmt.Errorf("delete %s: %w", in.Name, err)
	}
	m.closeSession(ctx, &in)
	// The network goes before the record: a crash in between re-runs this
	// delete, and the reconciler removes a network no record holds anyway.
	if err := m.removeNetwork(in); err != nil {
		return fmt.Errorf("delete %s: %w", in.Name, err)
	}
	// Rename first so a crash never leaves a half-removed dir under the
	// instance's own name; the reconciler removes temp dirs.
	trash, err := m.layout.DeletingGuest(in.ID)
	if err != nil {
		return err
	}
	if err := atomicfile.Rename(g.Jail, trash); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete %s: %w", in.Name, err)
	}
	if err := m.db.DeleteInstance(ctx, in.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	m.forget(in.ID)
	if err := os.RemoveAll(trash); err != nil {
		m.log.Warn("delete: remove dir", "instance", in.ID, "err", err)
	}
	m.forgetPrefetch(in.ID)
	if in.Networked {
		if err := m.dropIdleNetworking(ctx); err != nil {
			m.log.Warn("delete: drop the idle warm network pool", "err", err)
		}
	}
	m.log.Info("instance deleted", "instance", in.ID, "name", in.Name)
	return nil
}
