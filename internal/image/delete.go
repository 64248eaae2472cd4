package image

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/forkd/forkd/internal/store"
)

// Delete removes the image ref names (a reference or digest) with its
// tags, unless an instance or snapshot uses it (ErrInUse, naming them).
func (s *Store) Delete(ctx context.Context, ref string) (Image, error) {
	im, err := s.Lookup(ctx, ref)
	if err != nil {
		return Image{}, err
	}
	l := s.lock(im.Digest)
	l.Lock()
	defer l.Unlock()
	users, err := s.db.ImageUsers(ctx, im.Digest, 5)
	if err != nil {
		return Image{}, err
	}
	if len(users) > 0 {
		return Image{}, fmt.Errorf("%w: image %s is used by %s; delete those first", ErrInUse, im.Digest, strings.Join(users, ", "))
	}
	jid, err := s.db.Begin(ctx, KindDelete, im.Digest, struct{}{})
	if err != nil {
		return Image{}, err
	}
	s.cfg.StepHook(KindDelete, "begun")
	err = s.finishDelete(ctx, im.Digest)
	outcome := "done"
	if err != nil {
		outcome = "failed: " + err.Error()
	}
	s.db.Finish(ctx, jid, outcome)
	return im, err
}

// finishDelete is delete's body, idempotent so the reconciler can re-run
// it: rename the dir aside, delete the record (and tags), remove the dir.
func (s *Store) finishDelete(ctx context.Context, digest string) error {
	d, err := s.cfg.Layout.Image(digest)
	if err != nil {
		return err
	}
	trash, _ := s.cfg.Layout.DeletingImage(digest)
	if err := atomicfile.Rename(d.Dir, trash); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete image %s: %w", digest, err)
	}
	if err := s.db.DeleteImage(ctx, digest); err != nil && !errors.Is(err, store.ErrNotFound) {
		if errors.Is(err, store.ErrInUse) {
			// Only a reconciled delete can meet this (the live path checked
			// under the lock): put the files back.
			atomicfile.Rename(trash, d.Dir)
			return fmt.Errorf("%w: %v", ErrInUse, err)
		}
		return err
	}
	if err := os.RemoveAll(trash); err != nil {
		s.log.Warn("image delete: remove dir", "image", digest, "err", err)
	}
	s.log.Info("image deleted", "image", digest)
	return nil
}

// GC deletes every image no instance or snapshot uses and returns them.
func (s *Store) GC(ctx context.Context) ([]Image, error) {
	all, err := s.List(ctx)
	if err != nil {
		return nil, err
	}
	var out []Image
	var errs []error
	for _, im := range all {
		del, err := s.Delete(ctx, im.Digest)
		switch {
		case err == nil:
			out = append(out, del)
		case errors.Is(err, ErrInUse), errors.Is(err, ErrNotFound):
		default:
			errs = append(errs, err)
		}
	}
	return out, errors.Join(errs...)
}
