package instance

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/memfile"
	"github.com/forkd/forkd/internal/store"
)

// startCompression compresses a snapshot's mem-file in the background, after
// the snapshot is durable: memory → memory.zst (temp + rename), then, under
// the snapshot's write lock (no fork is linking it), the raw name is removed
// and the state becomes compressed. A fork of a compressed snapshot
// materialises the raw mem-file again, once (materialise).
func (m *Manager) startCompression(rec store.Snapshot) {
	ctx, cancel := context.WithCancel(m.ctx)
	m.mu.Lock()
	m.compressing[rec.ID] = cancel
	m.mu.Unlock()
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer func() {
			m.mu.Lock()
			delete(m.compressing, rec.ID)
			m.mu.Unlock()
			cancel()
		}()
		if err := m.compress(ctx, rec.ID); err != nil {
			if errors.Is(err, context.Canceled) {
				m.log.Info("snapshot compression cancelled", "snapshot", rec.ID)
				return
			}
			m.log.Error("snapshot compression failed", "snapshot", rec.ID, "err", err)
			if cur, gerr := m.db.GetSnapshot(context.Background(), rec.ID); gerr == nil && cur.State == snapCompressing {
				cur.State, cur.Compression = snapReady, "none"
				if uerr := m.db.UpdateSnapshot(context.Background(), cur); uerr != nil {
					m.log.Error("snapshot compression failed and its record could not say so", "snapshot", rec.ID, "err", uerr)
				}
			}
		}
	}()
}

func (m *Manager) compress(ctx context.Context, id string) error {
	sd, err := m.layout.Snapshot(id)
	if err != nil {
		return err
	}
	// After a crash between dropping the raw mem-file and recording it, only
	// the (complete: written via temp + rename) memory.zst is left: finish.
	_, rawErr := os.Stat(sd.Memory())
	_, zstErr := os.Stat(sd.MemoryZst())
	if !(errors.Is(rawErr, os.ErrNotExist) && zstErr == nil) {
		if err := memfile.Compress(ctx, sd.Memory(), sd.MemoryZst(), memfile.CompressOptions{}); err != nil {
			return fmt.Errorf("compress snapshot %s: %w", id, err)
		}
	}
	crashPoint("compress", "compressed") // test hook (crashhook.go)
	rec, unlock, err := m.lockSnapshot(ctx, id, true)
	if err != nil {
		return err // deleted meanwhile
	}
	defer unlock()
	if err := os.Remove(sd.Memory()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("compress snapshot %s: drop raw: %w", id, err)
	}
	if err := atomicfile.SyncDir(sd.Dir); err != nil {
		return err
	}
	crashPoint("compress", "raw-removed") // test hook (crashhook.go)
	rec.State = snapCompressed
	rec.SizeBytes = dirBytes(sd)
	if err := m.db.UpdateSnapshot(ctx, rec); err != nil {
		return err
	}
	m.log.Info("snapshot compressed", "snapshot", id, "size_bytes", rec.SizeBytes)
	return nil
}

func (m *Manager) cancelCompression(id string) {
	m.mu.Lock()
	cancel := m.compressing[id]
	m.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// materialise makes sure a snapshot has its raw mem-file, decompressing it
// ONCE (temp + rename, under the snapshot's materialise mutex) if only the
// compressed one is left; later forks hardlink the result. Caller holds the
// snapshot's read lock.
func (m *Manager) materialise(ctx context.Context, id string, sd guestdir.SnapDir) error {
	l := m.snapshotLock(id)
	l.materialise.Lock()
	defer l.materialise.Unlock()
	if _, err := os.Stat(sd.Memory()); err == nil {
		return nil
	}
	if err := memfile.Decompress(ctx, sd.MemoryZst(), sd.Memory(), nil); err != nil {
		return fmt.Errorf("materialise snapshot %s: %w", id, err)
	}
	// Forks link it: sealed, like every file of the store (inodes.go).
	if err := sealPath(sd.Memory()); err != nil {
		return fmt.Errorf("materialise snapshot %s: %w", id, err)
	}
	m.log.Info("snapshot mem-file materialised", "snapshot", id)
	return nil
}
