package reliability

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/daemonproc"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/prefetch"
)

// isStable reports whether an instance may be in state when no operation
// is in flight. Error and the transient states are not stable.
func isStable(state string) bool {
	switch state {
	case api.StateCreated, api.StateRunning, api.StatePaused, api.StateStandby, api.StateStopped:
		return true
	}
	return false
}

// isRootEntry reports whether forkd keeps name directly in its data dir.
func isRootEntry(name string) bool {
	switch name {
	case "forkd.db", "forkd.db-wal", "forkd.db-shm", "forkd.db-journal",
		"forkd.lock", "forkd.sock", "jail", "exec", "snapshots", "pager", "images", "prefetch":
		return true
	}
	return false
}

// WaitSettled waits (up to timeout) until no snapshot is compressing and no
// instance is in a transient state: the state a daemon reaches at rest.
func WaitSettled(ctx context.Context, c *api.Client, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		busy := ""
		snaps, err := c.ListSnapshots(ctx)
		if err != nil {
			return err
		}
		for _, s := range snaps {
			if s.State == "compressing" {
				busy = "snapshot " + s.Name + " compressing"
			}
		}
		insts, err := c.ListInstances(ctx)
		if err != nil {
			return err
		}
		for _, in := range insts {
			if !isStable(in.State) && in.State != api.StateError {
				busy = "instance " + in.Name + " " + in.State
			}
		}
		if busy == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not settled after %v: %s", timeout, busy)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// CheckInvariants checks what must hold of a daemon at rest, after any
// crash, fault or load (RELIABILITY.md):
//   - every instance is in a stable state (not Error, not transient);
//   - Standby instances have a complete snapshot-latest, Stopped ones none;
//   - every Running/Paused instance has a live VMM at its recorded pid, and
//     every VMM under the data dir belongs to such an instance (none leaked);
//   - every VMM is jailed (unless the daemon says vmm_jailer none): its own
//     non-root uid and gid, its jail root as its root, a network namespace
//     that is not the daemon's, a memory limit, a seccomp filter;
//   - every inode with more than one link is sealed (root-owned, writable
//     by nobody), and no VMM can write a file with more than one link (no
//     shared inode is written: invariant 3 of docs/architecture.md §3), and every mem-file a VMM maps is still linked
//     from its own guest dir whenever anyone links it (else a sibling sees a
//     link count of 1 and diff-writes it in place under the running VM);
//   - no temp file or dir, no dir without a record, nothing unknown at the
//     data dir's top level;
//   - every working-set recording in prefetch/ decodes and records the key
//     it is named after (a stale or torn one is never kept);
//   - every snapshot has its files;
//   - the pager (if one runs) has no more sessions than Uffd-backed VMs;
//   - no Running instance reports a memory integrity error.
//
// It returns every violation found, joined.
func CheckInvariants(ctx context.Context, d *Daemon) error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	c, layout := d.Client, d.Layout

	insts, err := c.ListInstances(ctx)
	if err != nil {
		return fmt.Errorf("list instances: %w", err)
	}
	snaps, err := c.ListSnapshots(ctx)
	if err != nil {
		return fmt.Errorf("list snapshots: %w", err)
	}
	byID := map[string]api.Instance{}
	uffdVMs := 0
	for _, in := range insts {
		byID[in.ID] = in
		if !isStable(in.State) {
			bad("instance %s (%s) is %s, not a stable state (error %q)", in.Name, in.ID, in.State, in.Error)
		}
		g, err := layout.Guest(in.ID)
		if err != nil {
			bad("instance %s: id %q: %v", in.Name, in.ID, err)
			continue
		}
		if st, err := os.Stat(g.Dir); err != nil || !st.IsDir() {
			bad("instance %s: guest dir %s missing: %v", in.Name, g.Dir, err)
		}
		latest := g.Latest()
		switch in.State {
		case api.StateStandby:
			for _, p := range []string{latest.VMState(), latest.Memory()} {
				if st, err := os.Stat(p); err != nil || !st.Mode().IsRegular() || st.Size() == 0 {
					bad("Standby instance %s: %s missing or empty: %v", in.Name, p, err)
				}
			}
		case api.StateStopped, api.StateCreated:
			if _, err := os.Stat(latest.Memory()); err == nil {
				bad("%s instance %s still has %s", in.State, in.Name, latest.Memory())
			}
		case api.StateRunning, api.StatePaused:
			if in.Pid <= 0 || syscall.Kill(in.Pid, 0) != nil || daemonproc.IsZombie(in.Pid) {
				bad("%s instance %s: VMM pid %d is not alive", in.State, in.Name, in.Pid)
			}
			if in.RestoreBackend == api.BackendUffd {
				uffdVMs++
			}
			if in.MemoryCheck != "ok" && in.MemoryCheck != "unknown" {
				bad("instance %s: memory integrity error: %s", in.Name, in.MemoryCheck)
			}
		}
	}

	health, err := c.Health(ctx)
	if err != nil {
		return fmt.Errorf("health: %w", err)
	}
	jailed := health.Jailer != "none"
	pagerRuns := false
	for _, p := range ProcessesUnder(layout.Root()) {
		switch p.Kind {
		case "pager":
			pagerRuns = true
		case "vmm":
			id := p.ID
			in, ok := byID[id]
			if !ok || (in.State != api.StateRunning && in.State != api.StatePaused) || in.Pid != p.Pid {
				bad("leaked VMM pid %d (api sock %s): instance %q state %q pid %d", p.Pid, p.APISock, in.Name, in.State, in.Pid)
			}
			for _, w := range sharedWrites(p.Pid, layout.Root()) {
				bad("shared inode writable by a VMM: %s", w)
			}
			if g, err := layout.Guest(id); err == nil {
				for _, u := range unpinnedMappings(p.Pid, layout.Root(), g.Dir) {
					bad("mapped mem-file not counted in its link count: %s", u)
				}
				if jailed {
					for _, b := range jailBreaches(p.Pid, d.Pid(), g.Dir) {
						bad("VMM of %s not jailed: %s", in.Name, b)
					}
				}
			}
		}
	}
	if pagerRuns {
		if raw, err := c.PagerStats(ctx); err == nil {
			var st struct {
				ActiveSessions int `json:"active_sessions"`
				Sessions       []struct {
					SessionID string `json:"session_id"`
					State     string `json:"state"`
				} `json:"sessions"`
			}
			if json.Unmarshal(raw, &st) == nil && st.ActiveSessions > uffdVMs {
				bad("pager has %d active sessions but only %d Uffd-backed VMs run (sessions leaked): %+v", st.ActiveSessions, uffdVMs, st.Sessions)
			}
		}
	}

	snapIDs := map[string]bool{}
	for _, s := range snaps {
		snapIDs[s.ID] = true
		sd, err := layout.Snapshot(s.ID)
		if err != nil {
			bad("snapshot %s: id %q: %v", s.Name, s.ID, err)
			continue
		}
		if _, err := os.Stat(sd.VMState()); err != nil {
			bad("snapshot %s: %v", s.Name, err)
		}
		_, rawErr := os.Stat(sd.Memory())
		_, zstErr := os.Stat(sd.MemoryZst())
		if rawErr != nil && zstErr != nil {
			bad("snapshot %s (%s): no mem-file (neither memory nor memory.zst)", s.Name, s.State)
		}
		if s.State != "ready" && s.State != "compressed" {
			bad("snapshot %s is %q, not ready or compressed", s.Name, s.State)
		}
	}

	images, err := c.ListImages(ctx)
	if err != nil {
		return fmt.Errorf("list images: %w", err)
	}
	imageDigests := map[string]bool{}
	for _, im := range images {
		imageDigests[im.Digest] = true
		d, err := layout.Image(im.Digest)
		if err != nil {
			bad("image %s: %v", im.Digest, err)
			continue
		}
		if st, err := os.Stat(d.Rootfs()); err != nil || st.Size() != im.SizeBytes {
			bad("image %s: rootfs.ext4 missing or not %d bytes: %v", im.Digest, im.SizeBytes, err)
		}
	}
	for _, in := range insts {
		if in.Image != "" && !imageDigests[in.Image] {
			bad("instance %s uses image %s, which is gone", in.Name, in.Image)
		}
	}
	for _, s := range snaps {
		if s.Image != "" && !imageDigests[s.Image] {
			bad("snapshot %s uses image %s, which is gone", s.Name, s.Image)
		}
	}

	for _, u := range jail.UnsealedLinks(layout.Root()) {
		bad("shared inode a VMM could write (not root-owned read-only): %s", u)
	}
	errs = append(errs, leftovers(layout, byID, snapIDs)...)
	errs = append(errs, imageLeftovers(layout, imageDigests)...)
	errs = append(errs, badRecordings(layout)...)
	return errors.Join(errs...)
}

// badRecordings lists files in prefetch/ that are not a recording of the
// key they are named after. A temp recording may exist while a restore's
// recording is being written; it is not checked.
func badRecordings(layout guestdir.Layout) []error {
	ents, err := os.ReadDir(layout.PrefetchDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return []error{err}
	}
	var errs []error
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".ws.tmp") {
			continue
		}
		key, ok := guestdir.WorkingSetKey(e.Name())
		if !ok {
			errs = append(errs, fmt.Errorf("unexpected entry in %s: %s", layout.PrefetchDir(), e.Name()))
			continue
		}
		b, err := os.ReadFile(filepath.Join(layout.PrefetchDir(), e.Name()))
		if err == nil {
			var rec prefetch.Recording
			if rec, err = prefetch.Decode(b); err == nil && rec.Key != key {
				err = fmt.Errorf("it records key %s", rec.Key)
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("recording %s: %w", e.Name(), err))
		}
	}
	return errs
}

// imageLeftovers lists entries under images/ that are not a recorded
// image's directory (a temp dir, a dir no record claims, anything else).
func imageLeftovers(layout guestdir.Layout, recorded map[string]bool) []error {
	ents, err := os.ReadDir(layout.ImagesDir())
	if err != nil {
		return []error{err}
	}
	var errs []error
	for _, e := range ents {
		if d := guestdir.ImageDigestOf(e.Name()); d == "" || !recorded[d] || !e.IsDir() {
			errs = append(errs, fmt.Errorf("leftover %s (no image record)", filepath.Join(layout.ImagesDir(), e.Name())))
		}
	}
	return errs
}

// leftovers lists temp files and dirs, and dirs no record claims.
func leftovers(layout guestdir.Layout, insts map[string]api.Instance, snaps map[string]bool) []error {
	var errs []error
	top, err := os.ReadDir(layout.Root())
	if err != nil {
		return []error{err}
	}
	for _, e := range top {
		if !isRootEntry(e.Name()) {
			errs = append(errs, fmt.Errorf("unexpected entry in the data dir: %s", e.Name()))
		}
	}
	// jail/ holds the one exec dir of the daemon's VMM kind (a guest of the
	// other kind, or of the layout before jails, is migrated at start).
	jails, _ := os.ReadDir(layout.JailBase())
	for _, e := range jails {
		if e.Name() != layout.Exec() {
			errs = append(errs, fmt.Errorf("unexpected entry in %s: %s", layout.JailBase(), e.Name()))
		}
	}
	for _, root := range []struct {
		dir   string
		known func(string) bool
	}{
		{layout.JailsDir(), func(n string) bool { _, ok := insts[n]; return ok }},
		{layout.SnapshotsDir(), func(n string) bool { return snaps[n] }},
	} {
		ents, err := os.ReadDir(root.dir)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, e := range ents {
			if _, ok := guestdir.PooledID(e.Name()); ok && root.dir == layout.JailsDir() {
				// The daemon's pool of empty fork trees: no VM's, and it
				// must hold no file.
				errs = append(errs, emptyTree(filepath.Join(root.dir, e.Name()))...)
				continue
			}
			if guestdir.IsTemp(e.Name()) || !root.known(e.Name()) {
				errs = append(errs, fmt.Errorf("leftover %s (no record)", filepath.Join(root.dir, e.Name())))
				continue
			}
			filepath.WalkDir(filepath.Join(root.dir, e.Name()), func(p string, de fs.DirEntry, err error) error {
				if err == nil && (strings.HasSuffix(de.Name(), ".tmp") || guestdir.IsTemp(de.Name())) {
					errs = append(errs, fmt.Errorf("leftover temp file %s", p))
				}
				return nil
			})
		}
	}
	return errs
}

// emptyTree reports every entry under dir that is not a directory: a
// pooled fork tree holds none until a fork takes it.
func emptyTree(dir string) []error {
	var errs []error
	err := filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err == nil && !de.IsDir() {
			errs = append(errs, fmt.Errorf("pooled fork tree holds %s (a %s)", p, de.Type()))
		}
		return err
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) { // a fork may take the tree mid-walk
		errs = append(errs, err)
	}
	return errs
}
