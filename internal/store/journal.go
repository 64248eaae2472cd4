package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Entry is one journalled operation.
type Entry struct {
	ID         int64
	Kind       string          // "create", "standby", "restore", "fork", "snapshot", ...
	Subject    string          // the instance or snapshot id it acts on
	Step       string          // the last step recorded
	Payload    json.RawMessage // operation-specific JSON
	StartedAt  time.Time
	FinishedAt time.Time // zero while open
	Outcome    string    // "done", "rolled back", "failed: ..." once finished
}

// Begin records that an operation is about to act. It must be called, and
// must succeed, before the operation changes anything on disk or in a VMM.
func (s *Store) Begin(ctx context.Context, kind, subject string, payload any) (int64, error) {
	return begin(ctx, s.w(), kind, subject, payload)
}

// The journal's writes, prepared once (stmts.go).
const (
	qJournalBegin       = `INSERT INTO journal (kind, subject, step, payload, started_at) VALUES (?,?,?,?,?)`
	qJournalStep        = `UPDATE journal SET step = ? WHERE id = ?`
	qJournalStepPayload = `UPDATE journal SET step = ?, payload = ? WHERE id = ?`
	qJournalFinish      = `UPDATE journal SET finished_at = ?, outcome = ? WHERE id = ?`
)

func begin(ctx context.Context, x execer, kind, subject string, payload any) (int64, error) {
	b, err := json.Marshal(payload)
	if err != nil {
		return 0, fmt.Errorf("journal begin %s %s: %w", kind, subject, err)
	}
	res, err := x.ExecContext(ctx, qJournalBegin, kind, subject, "begun", string(b), time.Now().UnixNano())
	if err != nil {
		return 0, fmt.Errorf("journal begin %s %s: %w", kind, subject, err)
	}
	return res.LastInsertId()
}

// Step records that an open operation reached step. A nil payload keeps the
// entry's payload; otherwise it replaces it.
func (s *Store) Step(ctx context.Context, id int64, step string, payload any) error {
	return stepEntry(ctx, s.w(), id, step, payload)
}

func stepEntry(ctx context.Context, x execer, id int64, step string, payload any) error {
	var err error
	if payload == nil {
		_, err = x.ExecContext(ctx, qJournalStep, step, id)
	} else {
		var b []byte
		if b, err = json.Marshal(payload); err == nil {
			_, err = x.ExecContext(ctx, qJournalStepPayload, step, string(b), id)
		}
	}
	if err != nil {
		return fmt.Errorf("journal %d step %s: %w", id, step, err)
	}
	return nil
}

// Finish closes an operation with an outcome.
func (s *Store) Finish(ctx context.Context, id int64, outcome string) error {
	return finishEntry(ctx, s.w(), id, outcome)
}

func finishEntry(ctx context.Context, x execer, id int64, outcome string) error {
	if _, err := x.ExecContext(ctx, qJournalFinish, time.Now().UnixNano(), outcome, id); err != nil {
		return fmt.Errorf("journal %d finish: %w", id, err)
	}
	return nil
}

// OpenEntries returns the operations begun and not finished, oldest first:
// what a crash interrupted.
func (s *Store) OpenEntries(ctx context.Context) ([]Entry, error) {
	return s.entries(ctx, `WHERE finished_at IS NULL ORDER BY id`)
}

// Entries returns the most recent n entries, newest first.
func (s *Store) Entries(ctx context.Context, n int) ([]Entry, error) {
	return s.entries(ctx, fmt.Sprintf(`ORDER BY id DESC LIMIT %d`, n))
}

func (s *Store) entries(ctx context.Context, where string) ([]Entry, error) {
	rows, err := s.r().QueryContext(ctx, `SELECT id, kind, subject, step, payload, started_at, finished_at, outcome FROM journal `+where)
	if err != nil {
		return nil, fmt.Errorf("journal entries: %w", err)
	}
	defer rows.Close()
	var out []Entry
	for rows.Next() {
		var e Entry
		var payload string
		var started int64
		var finished sql.NullInt64
		if err := rows.Scan(&e.ID, &e.Kind, &e.Subject, &e.Step, &payload, &started, &finished, &e.Outcome); err != nil {
			return nil, fmt.Errorf("journal entries: %w", err)
		}
		e.Payload = json.RawMessage(payload)
		e.StartedAt = time.Unix(0, started).UTC()
		if finished.Valid {
			e.FinishedAt = time.Unix(0, finished.Int64).UTC()
		}
		out = append(out, e)
	}
	return out, rows.Err()
}

// PruneJournal deletes finished entries except the newest keep; open
// entries are never pruned. It returns how many it deleted.
func (s *Store) PruneJournal(ctx context.Context, keep int) (int64, error) {
	res, err := s.db.ExecContext(ctx, `DELETE FROM journal WHERE finished_at IS NOT NULL AND id NOT IN
		(SELECT id FROM journal WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT ?)`, keep)
	if err != nil {
		return 0, fmt.Errorf("prune journal: %w", err)
	}
	return res.RowsAffected()
}

// Names reports whether any journal entry, open or finished (finished ones
// are kept up to the prune limit), has subject as its subject: the journal's
// proof that forkd itself made a directory of that id.
func (s *Store) Names(ctx context.Context, subject string) (bool, error) {
	var one int
	err := s.r().QueryRowContext(ctx, `SELECT 1 FROM journal WHERE subject = ? LIMIT 1`, subject).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("journal names %s: %w", subject, err)
	}
	return true, nil
}
