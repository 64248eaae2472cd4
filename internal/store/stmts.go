package store

import (
	"context"
	"database/sql"
	"sync"
)

// Prepared statements. database/sql prepares a statement afresh for every
// ExecContext or QueryContext call, and SQLite parses it each time: parsing
// was about a fifth of a fork's CPU. The store prepares its hot statements
// once and reuses them.
//
// The writes are prepared at Open, on the one writer connection, while it is
// free: the group committer holds that connection for a whole group and
// could not prepare one then. A write whose text is not among them runs
// unprepared. Reads are prepared on first use (the read connections are a
// pool; database/sql prepares a statement again on each connection it
// meets).

// hotWrites are the writes a fork, and every journalled operation, makes.
var hotWrites = []string{
	qJournalBegin, qJournalStep, qJournalStepPayload, qJournalFinish,
	qInstanceInsert, qInstanceUpdate, qInstanceDelete,
}

// maxReadStmts bounds the read cache: a query built with a varying part
// (a LIMIT, say) is run unprepared once the cache is full.
const maxReadStmts = 64

// stmts holds the store's prepared statements.
type stmts struct {
	writes map[string]*sql.Stmt // prepared at Open, read-only after

	mu    sync.Mutex
	reads map[string]*sql.Stmt // guarded by mu
}

// prepareWrites prepares hotWrites on db.
func (p *stmts) prepareWrites(ctx context.Context, db *sql.DB) error {
	p.writes = map[string]*sql.Stmt{}
	for _, q := range hotWrites {
		st, err := db.PrepareContext(ctx, q)
		if err != nil {
			return err
		}
		p.writes[q] = st
	}
	return nil
}

// close closes every prepared statement.
func (p *stmts) close() {
	for _, st := range p.writes {
		st.Close()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, st := range p.reads {
		st.Close()
	}
	p.reads = nil
}

// writer runs the store's writes: through tx when set (a group), else each
// in a commit of its own on the writer connection.
type writer struct {
	s  *Store
	tx *sql.Tx
}

// w is the writer for writes outside a group.
func (s *Store) w() writer { return writer{s: s} }

func (w writer) ExecContext(ctx context.Context, q string, args ...any) (sql.Result, error) {
	st := w.s.stmts.writes[q]
	switch {
	case st != nil && w.tx != nil:
		return w.tx.StmtContext(ctx, st).ExecContext(ctx, args...)
	case st != nil:
		return st.ExecContext(ctx, args...)
	case w.tx != nil:
		return w.tx.ExecContext(ctx, q, args...)
	}
	return w.s.db.ExecContext(ctx, q, args...)
}

func (w writer) QueryRowContext(ctx context.Context, q string, args ...any) *sql.Row {
	if w.tx != nil {
		return w.tx.QueryRowContext(ctx, q, args...)
	}
	return w.s.db.QueryRowContext(ctx, q, args...)
}

// reader runs reads on the read connections, prepared once per query text.
type reader struct{ s *Store }

// r is the store's reader.
func (s *Store) r() reader { return reader{s: s} }

// stmt returns q prepared on the read connections, or nil to run it
// unprepared.
func (r reader) stmt(ctx context.Context, q string) *sql.Stmt {
	p := &r.s.stmts
	p.mu.Lock()
	defer p.mu.Unlock()
	if st, ok := p.reads[q]; ok {
		return st
	}
	if p.reads == nil || len(p.reads) >= maxReadStmts {
		return nil // closed, or full
	}
	st, err := r.s.rdb.PrepareContext(ctx, q)
	if err != nil {
		return nil // the unprepared query will report the error
	}
	p.reads[q] = st
	return st
}

func (r reader) QueryRowContext(ctx context.Context, q string, args ...any) *sql.Row {
	if st := r.stmt(ctx, q); st != nil {
		return st.QueryRowContext(ctx, args...)
	}
	return r.s.rdb.QueryRowContext(ctx, q, args...)
}

func (r reader) QueryContext(ctx context.Context, q string, args ...any) (*sql.Rows, error) {
	if st := r.stmt(ctx, q); st != nil {
		return st.QueryContext(ctx, args...)
	}
	return r.s.rdb.QueryContext(ctx, q, args...)
}
