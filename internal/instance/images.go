package instance

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/image"
	"github.com/forkd/forkd/internal/rootfs"
)

// The manager's image endpoints are thin: package image owns pulling,
// building, storing and deleting; the manager maps its errors and types to
// the API's and clones image disks for new VMs (CreateInstance).

// StartPull starts a background pull; GetPull reports it.
func (m *Manager) StartPull(ctx context.Context, req api.PullRequest) (api.Pull, error) {
	if err := m.checkImagePath(ctx, req.Ref); err != nil {
		return api.Pull{}, err
	}
	st, err := m.images.StartPull(req.Ref, req.Platform)
	if err != nil {
		return api.Pull{}, imageErr(err)
	}
	return pullToAPI(st), nil
}

// GetPull returns a pull operation by id (kept 10 minutes after it ends).
func (m *Manager) GetPull(ctx context.Context, id string) (api.Pull, error) {
	st, ok := m.images.Status(id)
	if !ok {
		return api.Pull{}, fmt.Errorf("%w: no pull %q (finished pulls are forgotten after a while and at a daemon restart; see the image list)", api.ErrNotFound, id)
	}
	return pullToAPI(st), nil
}

// ListImages returns every stored image.
func (m *Manager) ListImages(ctx context.Context) ([]api.Image, error) {
	list, err := m.images.List(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.Image, 0, len(list))
	for _, im := range list {
		out = append(out, imageToAPI(im))
	}
	return out, nil
}

// GetImage returns one stored image by reference, digest or digest prefix.
func (m *Manager) GetImage(ctx context.Context, ref string) (api.Image, error) {
	im, err := m.images.Lookup(ctx, ref)
	if err != nil {
		return api.Image{}, imageErr(err)
	}
	return imageToAPI(im), nil
}

// DeleteImage deletes an image no instance or snapshot uses.
func (m *Manager) DeleteImage(ctx context.Context, ref string) error {
	_, err := m.images.Delete(context.WithoutCancel(ctx), ref)
	return imageErr(err)
}

// GCImages deletes every image no instance or snapshot uses.
func (m *Manager) GCImages(ctx context.Context) (api.ImageGC, error) {
	gone, err := m.images.GC(context.WithoutCancel(ctx))
	res := api.ImageGC{Deleted: []api.Image{}}
	for _, im := range gone {
		res.Deleted = append(res.Deleted, imageToAPI(im))
		res.FreedBytes += im.DiskBytes
	}
	return res, imageErr(err)
}

// checkImagePath holds the path of an oci: or docker-archive: reference to
// the rules of every host path a client names (hostpath.Policy.Check):
// absolute, not under /proc, /sys or /dev or in the data dir, and over TCP
// only under host_path_dirs. (The image's blobs are then read by
// go-containerregistry and verified against their digests.)
func (m *Manager) checkImagePath(ctx context.Context, ref string) error {
	r, err := image.ParseRef(ref)
	if err != nil || r.Path == "" {
		return nil // a registry reference, or one Pull refuses with its own error
	}
	if err := m.hostFiles().Check("image", r.Path, api.IsRemote(ctx)); err != nil {
		return fmt.Errorf("%w: %v", api.ErrInvalid, err)
	}
	return nil
}

// imageErr maps package image's (and rootfs's) errors to the API's
// sentinels, keeping their text.
func imageErr(err error) error {
	var sentinel error
	switch {
	case err == nil:
		return nil
	case errors.Is(err, image.ErrNotFound):
		sentinel = api.ErrNotFound
	case errors.Is(err, image.ErrInUse):
		sentinel = api.ErrInvalidState
	case errors.Is(err, image.ErrUnreachable):
		sentinel = api.ErrUnavailable
	case errors.Is(err, rootfs.ErrNoSpace), errors.Is(err, syscall.ENOSPC):
		sentinel = api.ErrNoSpace
	case errors.Is(err, image.ErrInvalidRef), errors.Is(err, image.ErrPlatform), errors.Is(err, image.ErrCorrupt),
		errors.Is(err, image.ErrUnauthorized), errors.Is(err, rootfs.ErrUnsafe), errors.Is(err, rootfs.ErrTooSmall):
		sentinel = api.ErrInvalid
	default:
		return err
	}
	return fmt.Errorf("%w: %v", sentinel, err)
}

func imageToAPI(im image.Image) api.Image {
	refs := im.Refs
	if refs == nil {
		refs = []string{}
	}
	return api.Image{
		Digest: im.Digest, Refs: refs, SizeBytes: im.SizeBytes, DiskBytes: im.DiskBytes,
		ContentBytes: im.ContentBytes, Platform: im.Platform, Layers: im.Layers, CreatedAt: im.CreatedAt,
		Config: api.ImageConfig{Entrypoint: im.Run.Entrypoint, Cmd: im.Run.Cmd, Env: im.Run.Env,
			WorkingDir: im.Run.WorkingDir, User: im.Run.User},
	}
}

func pullToAPI(st image.PullStatus) api.Pull {
	p := api.Pull{
		ID: st.ID, Ref: st.Ref, Platform: st.Platform, State: st.State, Phase: st.Progress.Phase,
		LayersDone: st.Progress.LayersDone, LayersTotal: st.Progress.LayersTotal,
		BytesDone: st.Progress.BytesDone, BytesTotal: st.Progress.BytesTotal, StartedAt: st.StartedAt,
	}
	if !st.FinishedAt.IsZero() {
		t := st.FinishedAt
		p.FinishedAt = &t
	}
	if st.Image != nil {
		im := imageToAPI(*st.Image)
		p.Image = &im
	}
	if st.Err != nil {
		p.Error = api.ErrorOf(imageErr(st.Err))
	}
	return p
}

// acquireImage returns the image ref names, pulling it first if it is not
// stored, and checks that a disk of diskMiB (0: the image's own size) can
// hold it. It holds the image (no delete can take it) until release is
// called; CreateInstance releases it once the record naming the image is
// durable, after cloning the image's ext4 for the new disk.
func (m *Manager) acquireImage(ctx context.Context, ref string, diskMiB int) (im image.Image, release func(), err error) {
	if err := m.checkImagePath(ctx, ref); err != nil {
		return image.Image{}, nil, err
	}
	im, release, err = m.images.Acquire(ctx, ref)
	if err != nil {
		return image.Image{}, nil, imageErr(err)
	}
	if want := int64(diskMiB) << 20; diskMiB > 0 && want < im.SizeBytes {
		release()
		return image.Image{}, nil, fmt.Errorf("%w: image %s needs a disk of at least %d MiB; disk_size_mib %d is too small",
			api.ErrInvalid, ref, (im.SizeBytes+(1<<20)-1)>>20, diskMiB)
	}
	return im, release, nil
}
