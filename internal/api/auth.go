package api

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// BearerOptions are what RequireBearer reports failed authentications to.
type BearerOptions struct {
	// Logger receives failed authentications, rate-limited: the first at
	// once, then at most one line per LogEvery saying how many failed since
	// the last line (nil: not logged). A client guessing tokens must not be
	// able to flood the log.
	Logger   *slog.Logger
	LogEvery time.Duration // default 10 s
	// Registerer receives forkd_api_auth_failures_total{reason} (nil: not
	// registered).
	Registerer prometheus.Registerer
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
}

// RequireBearer lets through only requests carrying
// "Authorization: Bearer <token>". It guards the TCP listener; the Unix
// socket relies on its file mode (0600) instead. Failed authentications are
// counted and logged (see BearerOptions).
func RequireBearer(token string, next http.Handler, opts BearerOptions) (http.Handler, error) {
	failures := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "forkd_api_auth_failures_total",
		Help: "Requests to the TCP listener refused for a missing or wrong bearer token, by reason (missing, wrong).",
	}, []string{"reason"})
	for _, r := range []string{"missing", "wrong"} {
		failures.WithLabelValues(r) // export both series from the start
	}
	if opts.Registerer != nil {
		if err := opts.Registerer.Register(failures); err != nil {
			return nil, fmt.Errorf("register auth metrics: %w", err)
		}
	}
	lim := &failureLog{log: opts.Logger, every: opts.LogEvery, now: opts.Now}
	if lim.every <= 0 {
		lim.every = 10 * time.Second
	}
	if lim.now == nil {
		lim.now = time.Now
	}
	// Compare fixed-size digests in constant time, so neither the content
	// nor the length of the token leaks through response timing.
	want := sha256.Sum256([]byte(token))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := bearerToken(r.Header.Get("Authorization"))
		gotSum := sha256.Sum256([]byte(got))
		if !ok || token == "" || subtle.ConstantTimeCompare(gotSum[:], want[:]) != 1 {
			reason := "wrong"
			if !ok {
				reason = "missing"
			}
			failures.WithLabelValues(reason).Inc()
			lim.record(r, reason)
			w.Header().Set("WWW-Authenticate", `Bearer realm="forkd"`)
			writeError(w, errorf(http.StatusUnauthorized, CodeUnauthorized,
				"missing or wrong bearer token: send Authorization: Bearer <the daemon's token_file contents>"))
			return
		}
		next.ServeHTTP(w, r.WithContext(WithRemote(r.Context())))
	}), nil
}

type remoteKey struct{}

// WithRemote marks ctx as a TCP client's (RequireBearer does it for every
// request it lets through; tests use it to act as one).
func WithRemote(ctx context.Context) context.Context {
	return context.WithValue(ctx, remoteKey{}, true)
}

// IsRemote reports whether ctx is a request's that came through
// RequireBearer, i.e. over the TCP listener: its caller holds the token, not
// root's access to this host, so the Service narrows what it may name (host
// files only under host_path_dirs).
func IsRemote(ctx context.Context) bool {
	v, _ := ctx.Value(remoteKey{}).(bool)
	return v
}

// failureLog rate-limits the log lines of failed authentications.
type failureLog struct {
	log   *slog.Logger
	every time.Duration
	now   func() time.Time

	mu         sync.Mutex
	last       time.Time // when the last line was written; guarded by mu
	suppressed int       // failures since then, not logged; guarded by mu
}

func (f *failureLog) record(r *http.Request, reason string) {
	if f.log == nil {
		return
	}
	f.mu.Lock()
	now := f.now()
	if !f.last.IsZero() && now.Sub(f.last) < f.every {
		f.suppressed++
		f.mu.Unlock()
		return
	}
	n := f.suppressed
	f.last, f.suppressed = now, 0
	f.mu.Unlock()
	f.log.Warn("refused a request without the right bearer token",
		"remote", r.RemoteAddr, "reason", reason, "method", r.Method, "path", r.URL.Path,
		"also_refused_since_last_line", n)
}

func bearerToken(h string) (string, bool) {
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	return tok, tok != ""
}
