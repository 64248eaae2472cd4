package api_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// The fake's images: a pull of a reference containing "missing" fails
// with not_found; any other succeeds at once with an image whose digest is
// the hash of the reference.

func (f *fakeService) StartPull(ctx context.Context, req api.PullRequest) (api.Pull, error) {
	defer f.enter()()
	now := time.Now().UTC()
	p := &api.Pull{ID: fmt.Sprintf("pull%04d", len(f.pulls)+1), Ref: req.Ref, Platform: "linux/amd64",
		State: api.PullSucceeded, Phase: "done", LayersDone: 2, LayersTotal: 2, BytesDone: 100, BytesTotal: 100,
		StartedAt: now, FinishedAt: &now}
	if req.Platform != "" {
		p.Platform = req.Platform
	}
	if strings.Contains(req.Ref, "missing") {
		p.State, p.Phase = api.PullFailed, "resolving"
		p.Error = api.ErrorOf(fmt.Errorf("pull %s: %w: no such repository", req.Ref, api.ErrNotFound))
	} else {
		sum := sha256.Sum256([]byte(req.Ref))
		d := "sha256:" + hex.EncodeToString(sum[:])
		im, ok := f.images[d]
		if !ok {
			im = &api.Image{Digest: d, Refs: []string{req.Ref}, SizeBytes: 64 << 20, DiskBytes: 20 << 20,
				ContentBytes: 10 << 20, Platform: p.Platform, Layers: 2, CreatedAt: now,
				Config: api.ImageConfig{Entrypoint: []string{"/bin/app"}, Env: []string{"A=1"}, WorkingDir: "/"}}
			f.images[d] = im
		}
		cp := *im
		p.Image = &cp
	}
	f.pulls[p.ID] = p
	return *p, nil
}

func (f *fakeService) GetPull(ctx context.Context, id string) (api.Pull, error) {
	defer f.enter()()
	p, ok := f.pulls[id]
	if !ok {
		return api.Pull{}, fmt.Errorf("pull %q: %w", id, api.ErrNotFound)
	}
	return *p, nil
}

func (f *fakeService) resolveImage(ref string) (*api.Image, error) {
	for _, im := range f.images {
		if im.Digest == ref || strings.HasPrefix(im.Digest, "sha256:"+ref) {
			return im, nil
		}
		for _, r := range im.Refs {
			if r == ref {
				return im, nil
			}
		}
	}
	return nil, fmt.Errorf("image %q: %w", ref, api.ErrNotFound)
}

func (f *fakeService) ListImages(ctx context.Context) ([]api.Image, error) {
	defer f.enter()()
	var out []api.Image
	for _, im := range f.images {
		out = append(out, *im)
	}
	return out, nil
}

func (f *fakeService) GetImage(ctx context.Context, ref string) (api.Image, error) {
	defer f.enter()()
	im, err := f.resolveImage(ref)
	if err != nil {
		return api.Image{}, err
	}
	return *im, nil
}

func (f *fakeService) DeleteImage(ctx context.Context, ref string) error {
	defer f.enter()()
	im, err := f.resolveImage(ref)
	if err != nil {
		return err
	}
	for _, i := range f.instances {
		if i.Image == im.Digest {
			return fmt.Errorf("delete image %s: used by instance %s: %w", im.Digest, i.Name, api.ErrInvalidState)
		}
	}
	delete(f.images, im.Digest)
	return nil
}

func (f *fakeService) GCImages(ctx context.Context) (api.ImageGC, error) {
	defer f.enter()()
	res := api.ImageGC{Deleted: []api.Image{}}
	used := map[string]bool{}
	for _, i := range f.instances {
		used[i.Image] = true
	}
	for d, im := range f.images {
		if !used[d] {
			res.Deleted = append(res.Deleted, *im)
			res.FreedBytes += im.DiskBytes
			delete(f.images, d)
		}
	}
	return res, nil
}
