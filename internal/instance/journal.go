package instance

import (
	"context"
	"fmt"
)

// op is one journalled operation in progress. Begin it before acting, step
// it after each durable change, finish it at the end (see Reconcile for what
// each step means after a crash).
type op struct {
	m       *Manager
	id      int64
	kind    string
	subject string
}

// opPayload is the journal payload every kind shares; fields unused by a
// kind stay empty.
type opPayload struct {
	Source   string `json:"source,omitempty"`   // fork: source instance or snapshot id
	Snapshot string `json:"snapshot,omitempty"` // snapshot: the new snapshot's id
	Live     bool   `json:"live,omitempty"`     // fork/snapshot paused a running source
	Pid      int    `json:"pid,omitempty"`      // start/restore: the VMM launched
	Session  string `json:"session,omitempty"`  // restore: the pager session
	Prev     string `json:"prev,omitempty"`     // the state to roll back to
	// RollForward (fork): the Forking record already holds all but the
	// final state, so once the fork's dir exists under its own name the
	// reconciler completes the fork instead of removing it.
	RollForward bool `json:"roll_forward,omitempty"`
	// Batch and BatchSize (fork): the fork is one of a batch of BatchSize
	// (forkBatch), whose key is its first fork's id. The reconciler
	// completes such a fork only with every other fork of its batch
	// (rollForwardBatches), never alone.
	Batch     string `json:"batch,omitempty"`
	BatchSize int    `json:"batch_size,omitempty"`
}

func (m *Manager) begin(ctx context.Context, kind, subject string, p opPayload) (*op, error) {
	if err := declaredStep(kind, "begun"); err != nil {
		return nil, err
	}
	id, err := m.db.Begin(ctx, kind, subject, p)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", kind, subject, err)
	}
	crashPoint(kind, "begun") // test hook (crashhook.go); off unless FORKD_TEST_CRASH_AT is set
	return &op{m: m, id: id, kind: kind, subject: subject}, nil
}

// step records that the operation reached name. A nil payload keeps the
// previous one.
func (o *op) step(ctx context.Context, name string, p *opPayload) error {
	if err := declaredStep(o.kind, name); err != nil {
		return err
	}
	var payload any
	if p != nil {
		payload = p
	}
	if err := o.m.db.Step(ctx, o.id, name, payload); err != nil {
		return fmt.Errorf("%s %s: %w", o.kind, o.subject, err)
	}
	crashPoint(o.kind, name) // test hook (crashhook.go); off unless FORKD_TEST_CRASH_AT is set
	return nil
}

// finish closes the entry; err == nil is "done".
func (o *op) finish(ctx context.Context, err error) {
	outcome := "done"
	if err != nil {
		outcome = "failed: " + err.Error()
	}
	if ferr := o.m.db.Finish(ctx, o.id, outcome); ferr != nil {
		o.m.log.Error("journal finish", "op", o.kind, "instance", o.subject, "err", ferr)
	}
}
