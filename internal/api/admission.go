package api

import (
	"net/http"
	"strconv"
	"time"
)

// admissionRetryAfter is the Retry-After a busy answer suggests: heavy
// operations take from tens of milliseconds (a fork) to seconds (a large
// standby), so a second is a fair first guess.
const admissionRetryAfter = time.Second

// admission bounds the heavy operations in flight (create, start, standby,
// restore, fork, snapshot): past the limit a request is answered 429 busy
// with Retry-After at once, never queued, so a burst beyond what the host
// can do piles up in the clients' retries, not in the daemon.
type admission struct {
	slots chan struct{} // one token per heavy operation in flight; nil: no limit
}

func newAdmission(max int) *admission {
	if max <= 0 {
		return &admission{}
	}
	return &admission{slots: make(chan struct{}, max)}
}

// heavy admits next through the limit.
func (a *admission) heavy(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if a.slots == nil || !isHeavy(r) {
			next(w, r)
			return
		}
		select {
		case a.slots <- struct{}{}:
			defer func() { <-a.slots }()
			next(w, r)
		default:
			w.Header().Set("Retry-After", strconv.Itoa(int(admissionRetryAfter/time.Second)))
			writeError(w, errorf(http.StatusTooManyRequests, CodeBusy,
				"%s %s: %d heavy operations (create, start, standby, restore, fork, snapshot) are already running, the daemon's limit (max_heavy_ops); retry after %v",
				r.Method, r.URL.Path, cap(a.slots), admissionRetryAfter))
		}
	}
}

// isHeavy says whether r is an operation that copies or maps guest memory
// or boots a VMM. Pause, resume, stop and delete are cheap and never refused
// (stopping or deleting is how a user makes room).
func isHeavy(r *http.Request) bool {
	switch action := r.PathValue("action"); action {
	case "":
		return true // the routes wrapped without an {action}: create, fork, a batch of forks (one operation however many forks), snapshot
	case "start", "standby", "restore":
		return true
	default:
		return false
	}
}
