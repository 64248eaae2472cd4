package cli

import (
	"errors"
	"fmt"
	"io/fs"

	"github.com/forkd/forkd/internal/api"
)

// hintError attaches what to do next to an error.
type hintError struct {
	err  error
	hint string
}

func (h *hintError) Error() string { return h.err.Error() }
func (h *hintError) Unwrap() error { return h.err }

// withHint attaches a hint to err when cond(err) holds.
func withHint(err error, cond error, format string, args ...any) error {
	if err == nil || !errors.Is(err, cond) {
		return err
	}
	var h *hintError
	if errors.As(err, &h) {
		return err
	}
	return &hintError{err: err, hint: fmt.Sprintf(format, args...)}
}

// hintFor is the hint printed under an error: the command's own, else a
// general one for the kind of error.
func hintFor(err error) string {
	var h *hintError
	if errors.As(err, &h) {
		return h.hint
	}
	var ce *api.ConnectError
	var se *api.StatusError
	switch {
	case errors.As(err, &ce):
		return "is the daemon running? start it with `forkd serve` (as root), or point --host / FORKD_HOST at it"
	case errors.As(err, &se) && se.Code == api.CodeUnauthorized:
		return "this daemon needs its bearer token: pass --token-file or set FORKD_TOKEN_FILE"
	case errors.Is(err, api.ErrNotFound):
		return "list what exists with `forkd ps` or `forkd snapshot ls`"
	case errors.Is(err, api.ErrAmbiguous):
		return "use the exact name or the full id (`forkd ps` / `forkd snapshot ls` show both)"
	case errors.Is(err, api.ErrInsufficientResources):
		return "the host cannot hold it: free memory or disk (stop or stand by VMs, delete snapshots), or raise the limit the message names in the daemon's config; `forkd doctor` shows what the host has"
	case errors.Is(err, api.ErrExists):
		return "pick another name, or remove the old one first (`forkd rm NAME`)"
	case errors.Is(err, api.ErrInvalidState):
		return "check the current state with `forkd ps`"
	case errors.Is(err, fs.ErrPermission):
		return "run as root, or use a data dir you own (--data-dir / FORKD_DATA)"
	case errors.Is(err, api.ErrShuttingDown):
		return "the daemon is stopping; retry once it is back (`forkd version` shows when it answers)"
	case errors.Is(err, api.ErrUnavailable):
		return "the daemon is busy or a dependency (the pager) is down; retry, and check the daemon's log"
	}
	return ""
}
