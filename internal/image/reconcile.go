package image

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"

	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/store"
)

// ReconcileEntry settles one open journal entry of the store after a
// crash and says what it did; handled is false for kinds it does not own.
func (s *Store) ReconcileEntry(ctx context.Context, e store.Entry) (what string, handled bool, err error) {
	switch e.Kind {
	case KindDelete:
		return "finished the image delete", true, s.finishDelete(ctx, e.Subject)
	case KindPull:
	default:
		return "", false, nil
	}
	tmp, err := s.cfg.Layout.TempImage(e.Subject)
	if err != nil {
		return "", true, err
	}
	final, _ := s.cfg.Layout.Image(e.Subject)
	os.RemoveAll(tmp.Dir)
	if _, err := s.db.GetImage(ctx, e.Subject); err == nil {
		return "kept (image recorded)", true, nil
	}
	if e.Step == StepStored {
		js, err := os.ReadFile(final.Meta())
		var m meta
		if err == nil {
			err = json.Unmarshal(js, &m)
		}
		if err == nil && m.Digest == e.Subject {
			return "recorded the stored image", true, s.record(ctx, m)
		}
	}
	os.RemoveAll(final.Dir)
	return "removed the partial image", true, nil
}

// Sweep removes what a crash left under images/ and sets aside what it
// cannot account for, by the reconciler's rule: it deletes only what it can
// prove forkd made (a real directory with one of forkd's temp names; an
// image dir no record claims but the journal names), hands any other
// forkd-named entry to setAside (the manager moves it to lost+found), and
// leaves other names alone. It never follows a symlink. Records whose
// files are gone are dropped unless something uses them (those VMs have
// their own disks; the record is kept so the image is not silently lost).
func (s *Store) Sweep(ctx context.Context, setAside func(dir, name string) (string, error)) error {
	dir := s.cfg.Layout.ImagesDir()
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	all, err := s.db.ListImages(ctx)
	if err != nil {
		return err
	}
	recorded := map[string]bool{}
	for _, im := range all {
		recorded[im.Digest] = true
		d, _ := s.cfg.Layout.Image(im.Digest)
		if st, err := os.Lstat(d.Rootfs()); err != nil || !st.Mode().IsRegular() {
			s.log.Warn("reconcile: image files missing; dropping its record", "image", im.Digest, "err", err)
			if err := s.db.DeleteImage(ctx, im.Digest); err != nil {
				s.log.Error("reconcile: image record kept", "image", im.Digest, "err", err)
			}
		}
	}
	for _, e := range ents {
		name := e.Name()
		p := filepath.Join(dir, name)
		_, temp := guestdir.TempImageDigest(name)
		digest := guestdir.ImageDigestOf(name)
		realDir := e.Type().IsDir()
		switch {
		case !temp && digest == "":
			s.log.Warn("reconcile: not a forkd name: left alone", "path", p)
			continue
		case !realDir:
		case temp:
			s.log.Info("reconcile: removing temp dir", "path", p)
			if err := os.RemoveAll(p); err != nil {
				s.log.Error("reconcile: remove temp dir", "path", p, "err", err)
			}
			continue
		case recorded[digest]:
			continue
		default:
			named, err := s.db.Names(ctx, digest)
			if err != nil {
				return err
			}
			if named {
				s.log.Info("reconcile: removing an image dir the journal names and no record claims", "path", p)
				if err := os.RemoveAll(p); err != nil {
					s.log.Error("reconcile: remove dir", "path", p, "err", err)
				}
				continue
			}
		}
		dst, err := setAside(dir, name)
		if err != nil {
			s.log.Error("reconcile: cannot move an unaccounted entry to lost+found: left in place", "path", p, "err", err)
			continue
		}
		s.log.Warn("reconcile: no record or journal entry accounts for this entry: moved to lost+found", "path", p, "moved_to", dst)
	}
	return nil
}
