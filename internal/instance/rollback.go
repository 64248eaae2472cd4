package instance

import (
	"errors"
	"fmt"
)

// undo collects the steps a failed operation takes to put things back.
// Nothing it tries is lost: each step that fails is logged at once and
// joined into the operation's error, so the caller (and the journal's
// outcome) says both what failed and what could not be undone.
type undo struct {
	m       *Manager
	op, sub string // operation kind and subject, for the log
	errs    []error
}

func (m *Manager) undo(op, subject string) *undo {
	return &undo{m: m, op: op, sub: subject}
}

// do records the outcome of one undo step (nil: it worked).
func (u *undo) do(what string, err error) {
	if err == nil {
		return
	}
	u.m.log.Error("rollback step failed", "op", u.op, "instance", u.sub, "step", what, "err", err)
	u.errs = append(u.errs, fmt.Errorf("%s: %w", what, err))
}

// join returns err with every failed undo step joined to it.
func (u *undo) join(err error) error {
	if len(u.errs) == 0 {
		return err
	}
	return errors.Join(err, fmt.Errorf("and rolling back failed: %w", errors.Join(u.errs...)))
}

// fault returns the error a test injected at point ("" in production: the
// map is only ever set by this package's tests, before the manager is
// used), so the failure paths can be driven one step at a time, as the
// crash hook drives the crash paths.
func (m *Manager) fault(point string) error {
	if m.faultHook != nil {
		m.faultHook(point)
	}
	return m.faults[point]
}
