package instance

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"sort"
	"strings"

	"github.com/forkd/forkd/internal/datadir"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/store"
)

// ErrStoreLost is what New returns when the store is missing or empty while
// jail/, snapshots/ or an old guests/ still hold forkd's directories: the
// records of those VMs are gone, and starting would treat every one of them
// as a stranger.
var ErrStoreLost = errors.New("the store has no records of the VMs in the data dir")

// makeDataSubdirs makes the data dir's jail/, jail/<exec>/, exec/,
// snapshots/, pager/, images/ and prefetch/ and refuses one that exists but is not a
// real directory (a symlink there would send every create, and every
// reconciler removal, into whatever directory it names) or that someone
// other than the daemon's uid owns or can write (datadir.Check).
func makeDataSubdirs(l guestdir.Layout) error {
	if err := os.MkdirAll(l.Root(), 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	for _, d := range []string{l.JailBase(), l.JailsDir(), l.ExecDir(), l.SnapshotsDir(), l.PagerRoot(), l.ImagesDir(), l.PrefetchDir()} {
		// jail/ is root's alone: a jailed VMM's directory lies below it,
		// and no VMM needs to reach it from outside its jail; exec/ holds
		// the file every jailer copies or links into a jail.
		perm := os.FileMode(0o755)
		if d == l.JailBase() || d == l.JailsDir() || d == l.ExecDir() {
			perm = 0o700
		}
		if err := os.Mkdir(d, perm); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("data dir: %w", err)
		}
		st, err := os.Lstat(d)
		if err != nil {
			return fmt.Errorf("data dir: %w", err)
		}
		if !st.IsDir() {
			return fmt.Errorf("data dir: %s is a %s, not a directory forkd made; move it away (forkd never follows a symlink in its data dir)", d, fileKind(st.Mode()))
		}
		if err := datadir.Check(d); err != nil {
			return fmt.Errorf("data dir: %w", err)
		}
	}
	// The old layout's guests/, if any, is migrated: never through a link.
	if st, err := os.Lstat(l.LegacyGuestsDir()); err == nil && !st.IsDir() {
		return fmt.Errorf("data dir: %s is a %s, not a directory forkd made; move it away (forkd never follows a symlink in its data dir)", l.LegacyGuestsDir(), fileKind(st.Mode()))
	}
	return nil
}

func fileKind(m fs.FileMode) string {
	switch {
	case m&fs.ModeSymlink != 0:
		return "symlink"
	case m.IsDir():
		return "directory"
	case m.IsRegular():
		return "regular file"
	case m&fs.ModeNamedPipe != 0:
		return "FIFO"
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeDevice != 0:
		return "device"
	}
	return "special file"
}

// storeFileMissing reports whether the database file is absent or has no
// bytes, checked before store.Open creates it: either way the store about to
// be opened knows nothing.
func storeFileMissing(path string) (string, bool, error) {
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return "missing", true, nil
	case err != nil:
		return "", false, fmt.Errorf("store %s: %w", path, err)
	case st.Size() == 0:
		return "empty (0 bytes)", true, nil
	}
	return "", false, nil
}

// openStore opens the store, refusing (ErrStoreLost) a store that is
// missing or empty while guests/ or snapshots/ hold entries with forkd's
// names, unless allowOrphans: then the reconciler moves them to lost+found
// (it can prove none of them is forkd's to delete).
//
// Without this guard, `: > forkd.db` (or rm) followed by a start made the
// reconciler delete every guest and snapshot directory as a leftover, the
// directories of VMs still running among them.
func openStore(ctx context.Context, l guestdir.Layout, allowOrphans bool, log *slog.Logger) (*store.Store, error) {
	how, missing, err := storeFileMissing(l.DB())
	if err != nil {
		return nil, err
	}
	if missing {
		if err := guardOrphans(l, how, allowOrphans, log); err != nil {
			return nil, err
		}
	}
	db, err := store.OpenWith(ctx, l.DB(), storeOptions())
	if err != nil {
		return nil, err
	}
	if !missing {
		empty, err := db.Empty(ctx)
		if err == nil && empty {
			err = guardOrphans(l, "empty (no instance, snapshot or journal entry)", allowOrphans, log)
		}
		if err != nil {
			db.Close()
			return nil, err
		}
	}
	return db, nil
}

// guardOrphans is openStore's check once the store is known to hold no
// records: any entry with a forkd name under jail/<exec>/ (of either VMM
// kind), snapshots/ or an old guests/ is a VM or snapshot whose record is
// lost.
func guardOrphans(l guestdir.Layout, how string, allow bool, log *slog.Logger) error {
	var found, ids []string
	for _, dir := range append(guestDirsAnyLayout(l), l.SnapshotsDir()) {
		names, err := forkdEntries(dir)
		if err != nil {
			return err
		}
		for _, n := range names {
			found = append(found, dir+"/"+n)
			if dir != l.SnapshotsDir() {
				ids = append(ids, n)
			}
		}
	}
	if len(found) == 0 {
		return nil
	}
	pids := vmmsOf(ids)
	if allow {
		log.Warn("store is "+how+" but the data dir holds forkd entries: moving them to lost+found (--orphans-to-lost-found)",
			"store", l.DB(), "entries", len(found), "lost_found", l.LostFound(), "vmm_pids", pids)
		return nil
	}
	sample := found
	if len(sample) > 5 {
		sample = append(sample[:5:5], fmt.Sprintf("and %d more", len(found)-5))
	}
	vmms := ""
	if len(pids) > 0 {
		vmms = fmt.Sprintf("; VMMs still run for %d of them (pids %v)", len(pids), pids)
	}
	return fmt.Errorf("%w: refusing to start: the store %s is %s, but the data dir holds %d instance or snapshot directories (%s)%s. "+
		"forkd would no longer know which VM any of them is. Restore %s from a backup (with its -wal file, if you have one) and start again, "+
		"or start once with `forkd serve --orphans-to-lost-found` to move them to %s and begin with an empty store",
		ErrStoreLost, l.DB(), how, len(found), strings.Join(sample, ", "), vmms, l.DB(), l.LostFound())
}

// guestDirsAnyLayout lists every directory a guest dir of this data dir may
// lie in: each jail/<exec>/ there is, and the guests/ of the layout before
// jails.
func guestDirsAnyLayout(l guestdir.Layout) []string {
	out := []string{l.JailsDir(), l.LegacyGuestsDir()}
	ents, _ := os.ReadDir(l.JailBase())
	for _, e := range ents {
		if e.Type().IsDir() && e.Name() != l.Exec() && guestdir.ValidID(e.Name()) == nil {
			d, _ := l.JailsDirOf(e.Name())
			out = append(out, d)
		}
	}
	return out
}

// forkdEntries lists the entries of dir whose names forkd would act on: its
// ids and its temp names. Other names are never forkd's, and are left alone.
// A dir that does not exist has none.
func forkdEntries(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	var out []string
	for _, e := range ents {
		if _, temp := guestdir.TempID(e.Name()); temp || guestdir.IsForkdID(e.Name()) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// vmmsOf lists the pids of VMM processes started for one of the ids (their
// --id; a jailed VMM's socket path names no data dir).
func vmmsOf(ids []string) []int {
	want := map[string]bool{}
	for _, id := range ids {
		if tid, ok := guestdir.TempID(id); ok {
			id = tid
		}
		want[id] = true
	}
	var pids []int
	for _, p := range scanVMMs() {
		if want[p.id] {
			pids = append(pids, p.pid)
		}
	}
	sort.Ints(pids)
	return pids
}
