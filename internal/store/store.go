// Package store is forkd's metadata: instances, snapshots and the operation
// journal, in one SQLite database (modernc.org/sqlite, pure Go) opened in WAL
// mode with synchronous=FULL, so a committed row survives a crash or power
// loss. It knows nothing of VMs or files: the instance manager decides what
// rows mean. Every multi-step operation writes a journal entry before it acts
// (Begin), records each step (Step) and closes it (Finish); the startup
// reconciler reads the entries left open (Open) and finishes or rolls them back.
// Every instance and snapshot record is also kept in memory as committed
// (cache.go), and the lookups every operation starts with answer from it.
package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"

	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// Sentinel errors; the instance manager maps them to API errors.
var (
	ErrNotFound = errors.New("not found")
	ErrExists   = errors.New("already exists")
)

// Store is an open database. It is safe for concurrent use.
type Store struct {
	db    *sql.DB // the one writer connection
	rdb   *sql.DB // read-only connections for the hot reads (see OpenWith)
	stmts stmts   // prepared statements (stmts.go)
	opts  Options
	group groupQueue // the group committer's queue (group.go)
	// observer is told of every committed record write (observe.go).
	observer atomic.Pointer[func(Change)]
	// cache holds every instance and snapshot record (cache.go).
	cache recordCache
}

// Open opens (creating if needed) the database at path and applies pending
// migrations.
func Open(ctx context.Context, path string) (*Store, error) {
	return OpenWith(ctx, path, Options{})
}

// OpenWith is Open with options.
func OpenWith(ctx context.Context, path string, opts Options) (*Store, error) {
	q := url.Values{}
	for _, p := range []string{"journal_mode(WAL)", "synchronous(FULL)", "foreign_keys(ON)", "busy_timeout(10000)"} {
		q.Add("_pragma", p)
	}
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	// One connection: SQLite serialises writers anyway, and a single
	// connection makes every statement see the previous one's writes with no
	// SQLITE_BUSY. Our transactions are short.
	db.SetMaxOpenConns(1)
	s := &Store{db: db, opts: opts}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	// Reads get connections of their own: in WAL mode a reader never waits
	// for the writer, so a lookup does not queue behind a commit's fsync
	// (a burst of forks reads while their group commits). Every write
	// returns only once committed, so a read that starts after it sees it.
	rq := url.Values{}
	for _, p := range []string{"query_only(1)", "busy_timeout(10000)"} {
		rq.Add("_pragma", p)
	}
	if s.rdb, err = sql.Open("sqlite", "file:"+path+"?"+rq.Encode()); err != nil {
		db.Close()
		return nil, fmt.Errorf("open store %s: readers: %w", path, err)
	}
	s.rdb.SetMaxOpenConns(readConns)
	s.rdb.SetMaxIdleConns(readConns)
	s.stmts.reads = map[string]*sql.Stmt{}
	if err := s.stmts.prepareWrites(ctx, db); err != nil {
		s.stmts.close()
		s.rdb.Close()
		db.Close()
		return nil, fmt.Errorf("open store %s: prepare: %w", path, err)
	}
	if err := s.cache.load(ctx, s); err != nil {
		s.stmts.close()
		s.rdb.Close()
		db.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	reserveWAL(path + "-wal")
	s.group.wake = make(chan struct{}, 1)
	s.group.stopped = make(chan struct{})
	go s.commitLoop()
	return s, nil
}

// readConns is how many read connections the store keeps.
const readConns = 4

// walReserve is how much disk the WAL keeps allocated beyond what it holds.
const walReserve = 8 << 20

// reserveWAL allocates disk blocks for the WAL ahead of its end
// (fallocate with KEEP_SIZE: the file's size, which is all SQLite reads,
// does not change), so commits that grow it need no new blocks. On a full
// disk the store can then still record what failed and roll back the
// records it changed, instead of leaving them half-done; until the WAL
// first reaches its checkpoint size every commit grows it. Best effort: a
// filesystem without fallocate simply gets no reserve.
func reserveWAL(path string) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return
	}
	defer f.Close()
	unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE, 0, walReserve)
}

// Close stops the group committer (units still queued get ErrClosed) and
// closes the database.
func (s *Store) Close() error {
	s.closeGroup()
	s.stmts.close()
	return errors.Join(s.rdb.Close(), s.db.Close())
}

// migrations are applied in order; schema_version records how many ran.
// Never edit a released migration: append a new one.
var migrations = []string{
	`CREATE TABLE instances (
		id TEXT PRIMARY KEY,
		name TEXT NOT NULL UNIQUE,
		state TEXT NOT NULL,
		vcpus INTEGER NOT NULL,
		memory_mib INTEGER NOT NULL,
		kernel TEXT NOT NULL DEFAULT '',
		rootfs TEXT NOT NULL DEFAULT '',
		boot_args TEXT NOT NULL DEFAULT '',
		created_at INTEGER NOT NULL,
		source TEXT NOT NULL DEFAULT '',
		snapshot_cache_key TEXT NOT NULL DEFAULT '',
		memory_check TEXT NOT NULL DEFAULT '',
		fork_mode TEXT NOT NULL DEFAULT '',
		restore_backend TEXT NOT NULL DEFAULT '',
		pid INTEGER NOT NULL DEFAULT 0,
		error TEXT NOT NULL DEFAULT '',
		pager_session TEXT NOT NULL DEFAULT '',
		pager_version TEXT NOT NULL DEFAULT ''
	);
	CREATE TABLE snapshots (
		id TEXT PRIMARY KEY,
		name TEXT NOT NULL UNIQUE,
		source_instance TEXT NOT NULL DEFAULT '',
		created_at INTEGER NOT NULL,
		size_bytes INTEGER NOT NULL DEFAULT 0,
		compression TEXT NOT NULL DEFAULT 'none',
		state TEXT NOT NULL,
		snapshot_cache_key TEXT NOT NULL DEFAULT '',
		memory_mib INTEGER NOT NULL,
		vcpus INTEGER NOT NULL,
		kernel TEXT NOT NULL DEFAULT '',
		boot_args TEXT NOT NULL DEFAULT ''
	);
	CREATE TABLE journal (
		id INTEGER PRIMARY KEY AUTOINCREMENT,
		kind TEXT NOT NULL,
		subject TEXT NOT NULL,
		step TEXT NOT NULL DEFAULT '',
		payload TEXT NOT NULL DEFAULT '{}',
		started_at INTEGER NOT NULL,
		finished_at INTEGER,
		outcome TEXT NOT NULL DEFAULT ''
	);
	CREATE INDEX journal_open ON journal(finished_at) WHERE finished_at IS NULL;`,
	// networking (docs/architecture.md §13). net_slot is the VM's slot in the address
	// pool (-1: not networked); the unique index is what allocates it, so
	// two concurrent creates or forks never share one. net_guest and
	// net_mac are the guest identity the VM booted with (forks inherit
	// it), and a snapshot keeps its source's so forks of it get it too.
	// publishes are an instance's published ports; a host port is taken
	// once.
	`ALTER TABLE instances ADD COLUMN net_slot INTEGER NOT NULL DEFAULT -1;
	ALTER TABLE instances ADD COLUMN net_guest TEXT NOT NULL DEFAULT '';
	ALTER TABLE instances ADD COLUMN net_mac TEXT NOT NULL DEFAULT '';
	ALTER TABLE snapshots ADD COLUMN net_guest TEXT NOT NULL DEFAULT '';
	ALTER TABLE snapshots ADD COLUMN net_mac TEXT NOT NULL DEFAULT '';
	CREATE UNIQUE INDEX instances_net_slot ON instances(net_slot) WHERE net_slot >= 0;
	CREATE TABLE publishes (
		instance_id TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
		host_ip TEXT NOT NULL,
		host_port INTEGER NOT NULL,
		protocol TEXT NOT NULL,
		guest_port INTEGER NOT NULL,
		PRIMARY KEY (host_ip, host_port, protocol)
	);`,
	// 3: images (docs/architecture.md §5.9). An instance or snapshot names the image its
	// disk came from (image = manifest digest, "" for none), so an image in
	// use is never deleted.
	`CREATE TABLE images (
		digest TEXT PRIMARY KEY,
		size_bytes INTEGER NOT NULL,
		disk_bytes INTEGER NOT NULL,
		content_bytes INTEGER NOT NULL,
		platform TEXT NOT NULL,
		config TEXT NOT NULL DEFAULT '{}',
		layers INTEGER NOT NULL,
		created_at INTEGER NOT NULL
	);
	CREATE TABLE image_refs (
		ref TEXT PRIMARY KEY,
		digest TEXT NOT NULL REFERENCES images(digest) ON DELETE CASCADE,
		updated_at INTEGER NOT NULL
	);
	CREATE INDEX image_refs_digest ON image_refs(digest);
	ALTER TABLE instances ADD COLUMN image TEXT NOT NULL DEFAULT '';
	ALTER TABLE snapshots ADD COLUMN image TEXT NOT NULL DEFAULT '';`,
	// Warm network slots (docs/architecture.md §13): namespaces made ahead of any VM so a
	// fork takes a ready one instead of making it on its path. A row is
	// written before its namespace is made (ready 0) and marked ready once
	// it is whole; an allocation takes a ready row and deletes it in the
	// same transaction as the instance's record.
	`CREATE TABLE net_warm (slot INTEGER PRIMARY KEY, ready INTEGER NOT NULL DEFAULT 0);`,
	// 5 (fcver): the guest CID of a VM's vsock device, 0 for a VM without
	// one (booted before forkd gave every VM a vsock); a snapshot keeps its
	// source's, so its forks know whether their vmstate has the device.
	`ALTER TABLE instances ADD COLUMN vsock_cid INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE snapshots ADD COLUMN vsock_cid INTEGER NOT NULL DEFAULT 0;`,
	// 6: huge pages. '' for guest memory of 4 KiB pages, '2M' for memory
	// backed by 2 MiB hugetlbfs pages; a snapshot keeps its source's, as
	// its vmstate does, so its forks restore with the same pages.
	`ALTER TABLE instances ADD COLUMN huge_pages TEXT NOT NULL DEFAULT '';
	ALTER TABLE snapshots ADD COLUMN huge_pages TEXT NOT NULL DEFAULT '';`,
}

func (s *Store) migrate(ctx context.Context) error {
	if _, err := s.db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	var v int
	err := s.db.QueryRowContext(ctx, `SELECT version FROM schema_version`).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		if _, err := s.db.ExecContext(ctx, `INSERT INTO schema_version(version) VALUES (0)`); err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
	} else if err != nil {
		return fmt.Errorf("migrate: read version: %w", err)
	}
	if v > len(migrations) {
		return fmt.Errorf("migrate: database schema version %d is newer than this forkd (%d)", v, len(migrations))
	}
	for i := v; i < len(migrations); i++ {
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return fmt.Errorf("migrate %d: %w", i+1, err)
		}
		if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
			tx.Rollback()
			return fmt.Errorf("migrate %d: %w", i+1, err)
		}
		if _, err := tx.ExecContext(ctx, `UPDATE schema_version SET version = ?`, i+1); err != nil {
			tx.Rollback()
			return fmt.Errorf("migrate %d: %w", i+1, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migrate %d: %w", i+1, err)
		}
	}
	return nil
}

// Empty reports whether the store has never recorded anything: no
// instance, no snapshot and no journal entry. A store forkd has used keeps
// its journal (finished entries up to the prune limit), so an empty one is
// new, or was replaced or emptied behind forkd's back.
func (s *Store) Empty(ctx context.Context) (bool, error) {
	var n int
	err := s.db.QueryRowContext(ctx, `SELECT (SELECT COUNT(*) FROM instances) + (SELECT COUNT(*) FROM snapshots) +
		(SELECT COUNT(*) FROM journal)`).Scan(&n)
	if err != nil {
		return false, fmt.Errorf("store empty: %w", err)
	}
	return n == 0, nil
}

// SchemaVersion is the number of migrations applied.
func (s *Store) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.db.QueryRowContext(ctx, `SELECT version FROM schema_version`).Scan(&v)
	return v, err
}

// marks is the "?,?,…" of an INSERT with one placeholder per column of a
// comma-separated column list (so adding a column cannot leave a count
// behind).
func marks(cols string) string {
	return strings.TrimSuffix(strings.Repeat("?,", strings.Count(cols, ",")+1), ",")
}

// isUnique reports whether err is a UNIQUE / PRIMARY KEY constraint failure.
func isUnique(err error) bool {
	return err != nil && strings.Contains(err.Error(), "UNIQUE constraint failed")
}
