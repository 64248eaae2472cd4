package instance

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/forkd/forkd/internal/guestdir"
)

// The layout a guest dir can be found in at start, other than this
// daemon's jail/<exec>/<id>/root:
//   - <data>/guests/<id>/ (the layout before jails), the VMM's log in its
//     logs/vmm.log;
//   - <data>/jail/<other exec>/<id>/ (a data dir a daemon running the other
//     VMM kind used: emulator and Firecracker guests live under different
//     exec names).
//
// migrateLayout moves each into place before anything else reads a guest
// dir, one journalled operation per guest (kind "migrate", subject the id,
// payload {source}): begun → the dir renamed into place (and, from guests/,
// its log moved out of it) → "moved" → done. Every move is a rename on the
// data dir's filesystem, so no file's bytes or inode change: hardlinks
// between guests, forks and snapshots hold, cache keys hold, and a VMM
// still running from before the upgrade keeps running: its working
// directory, open files and API socket move with the directory (a Unix
// socket is reached by its inode, whatever path leads to it), and the
// reconciler adopts it by pid at the new path. A crash anywhere re-runs
// the move, which finishes what is left (each step checks what is already
// done).
func (m *Manager) migrateLayout(ctx context.Context) error {
	// First finish what a crash interrupted.
	open, err := m.db.OpenEntries(ctx)
	if err != nil {
		return err
	}
	for _, e := range open {
		if e.Kind != "migrate" {
			continue
		}
		var p opPayload
		if err := json.Unmarshal(e.Payload, &p); err != nil {
			return fmt.Errorf("migrate: journal payload %s: %w", e.Payload, err)
		}
		outcome := "reconciled: finished the move from " + p.Source
		if err := m.moveGuest(e.Subject, p.Source); err != nil {
			outcome = "reconcile failed: " + err.Error()
			m.log.Error("migrate: finish an interrupted move", "instance", e.Subject, "from", p.Source, "err", err)
		} else {
			m.log.Info("migrate: finished an interrupted move", "instance", e.Subject, "from", p.Source)
		}
		if err := m.db.Finish(ctx, e.ID, outcome); err != nil {
			return err
		}
	}
	sources := []string{m.layout.LegacyGuestsDir()}
	others, err := os.ReadDir(m.layout.JailBase())
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	for _, e := range others {
		if e.Type().IsDir() && e.Name() != m.layout.Exec() && guestdir.ValidID(e.Name()) == nil {
			dir, _ := m.layout.JailsDirOf(e.Name())
			sources = append(sources, dir)
		}
	}
	for _, dir := range sources {
		if err := m.migrateFrom(ctx, dir); err != nil {
			return err
		}
	}
	return nil
}

// migrateFrom moves every guest dir in dir (a LegacyGuestsDir or another
// exec's JailsDir) that a record or a journal entry names into this layout,
// removes forkd's temp dirs there (a half-built fork or a half-deleted
// guest, which the sweep would have removed), moves other forkd-named
// entries to lost+found (a dir nothing names must not become deletable by
// the migration's own journal entry), leaves names that are not forkd's
// alone, and removes dir once it is empty.
func (m *Manager) migrateFrom(ctx context.Context, dir string) error {
	st, err := os.Lstat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("migrate: %s is a %s, not a directory forkd made; move it away (forkd never follows a symlink in its data dir)", dir, fileKind(st.Mode()))
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	insts, err := m.db.ListInstances(ctx)
	if err != nil {
		return err
	}
	recorded := map[string]bool{}
	for _, in := range insts {
		recorded[in.ID] = true
	}
	left := 0
	for _, e := range ents {
		name, path := e.Name(), filepath.Join(dir, e.Name())
		_, temp := guestdir.TempID(name)
		switch {
		case !temp && !guestdir.IsForkdID(name):
			m.log.Warn("migrate: not a forkd name: left alone", "path", path)
			left++
		case !e.Type().IsDir() || (!temp && !recorded[name] && !m.journalNames(ctx, name)):
			dst, err := m.moveToLostFound(dir, name)
			if err != nil {
				return fmt.Errorf("migrate: %w", err)
			}
			m.log.Warn("migrate: no record or journal entry accounts for this entry: moved to lost+found", "path", path, "moved_to", dst)
		case temp:
			m.log.Info("migrate: removing a temp dir of the old layout", "path", path)
			if err := os.RemoveAll(path); err != nil {
				return fmt.Errorf("migrate: %w", err)
			}
		default:
			o, err := m.begin(ctx, "migrate", name, opPayload{Source: path})
			if err != nil {
				return fmt.Errorf("migrate: %w", err)
			}
			err = m.moveGuest(name, path)
			if err == nil {
				err = o.step(ctx, "moved", nil)
			}
			o.finish(ctx, err)
			if err != nil {
				return fmt.Errorf("migrate: %w", err)
			}
			m.log.Info("migrate: guest dir moved into the jail layout", "instance", name, "from", path)
		}
	}
	if left == 0 {
		if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("migrate: %w", err)
		}
		return atomicfile.SyncDir(filepath.Dir(dir))
	}
	m.log.Warn("migrate: the old directory keeps entries that are not forkd's", "dir", dir, "entries", left)
	return nil
}

// journalNames reports whether a journal entry names subject (an error
// counts as no: the entry then goes to lost+found, never away).
func (m *Manager) journalNames(ctx context.Context, subject string) bool {
	named, err := m.db.Names(ctx, subject)
	return err == nil && named
}

// moveGuest moves instance id's dir from src to this layout. It may be run
// again after a crash at any point: what is done already is skipped.
func (m *Manager) moveGuest(id, src string) error {
	g, err := m.layout.Guest(id)
	if err != nil {
		return err
	}
	if filepath.Dir(src) == m.layout.LegacyGuestsDir() {
		return m.moveLegacyGuest(id, src, g)
	}
	// Another exec's jail dir: its <id> level moves whole (root/ and log).
	if _, err := os.Lstat(g.Jail); err == nil {
		if _, serr := os.Lstat(src); serr == nil {
			return fmt.Errorf("move %s: both %s and %s exist: move one away", id, src, g.Jail)
		}
		return nil
	}
	if err := renameNoReplace(src, g.Jail); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("move %s: %w", id, err)
	}
	return syncDirs(filepath.Dir(src), m.layout.JailsDir())
}

// moveLegacyGuest moves guests/<id> to jail/<exec>/<id>/root and its log
// out of it, to jail/<exec>/<id>/vmm.log.
func (m *Manager) moveLegacyGuest(id, src string, g guestdir.Guest) error {
	_, oldLog, err := m.layout.LegacyGuest(id)
	if err != nil {
		return err
	}
	if err := os.Mkdir(g.Jail, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("move %s: %w", id, err)
	}
	if st, err := os.Lstat(g.Jail); err != nil || !st.IsDir() {
		return fmt.Errorf("move %s: %s is not a directory", id, g.Jail)
	}
	if _, err := os.Lstat(g.Dir); errors.Is(err, fs.ErrNotExist) {
		if err := renameNoReplace(src, g.Dir); err != nil {
			return fmt.Errorf("move %s: %w", id, err)
		}
	} else if _, serr := os.Lstat(src); serr == nil {
		return fmt.Errorf("move %s: both %s and %s exist: move one away", id, src, g.Dir)
	}
	// The log, now at root/logs/vmm.log, goes beside root/ (a VMM still
	// running keeps appending to it: it holds the file, not the name).
	inRoot := filepath.Join(g.Dir, filepath.Base(filepath.Dir(oldLog)), filepath.Base(oldLog))
	if st, err := os.Lstat(inRoot); err == nil && st.Mode().IsRegular() {
		if err := renameNoReplace(inRoot, g.VMMLog()); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("move %s: log: %w", id, err)
		}
	}
	os.Remove(filepath.Dir(inRoot)) // logs/, if now empty
	return syncDirs(g.Dir, g.Jail, m.layout.JailsDir(), m.layout.LegacyGuestsDir())
}

func syncDirs(dirs ...string) error {
	for _, d := range dirs {
		if err := atomicfile.SyncDir(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}
