package api

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	apispec "github.com/forkd/forkd/api"
	"github.com/forkd/forkd/internal/version"
)

// HandlerOptions are the handler's dependencies besides the Service.
type HandlerOptions struct {
	// Registerer receives the HTTP request metrics; nil means none.
	Registerer prometheus.Registerer
	// Gatherer is what GET /metrics exposes; nil means an empty exposition.
	Gatherer prometheus.Gatherer
	// Logger gets one line per failed request; nil discards.
	Logger *slog.Logger
	// Stopping, when closed, ends every event stream: a daemon that is
	// shutting down does not wait on clients that never hang up.
	Stopping <-chan struct{}
	// Advice, when set, is what GET /health advises about the host.
	Advice func() []string
	// MaxHeavyOps bounds the heavy operations (create, start, standby,
	// restore, fork, snapshot) in flight, a batch of forks counting as one;
	// past it a request gets 429 busy with Retry-After. 0 means no limit.
	MaxHeavyOps int
}

type handler struct {
	svc      Service
	log      *slog.Logger
	stopping <-chan struct{}
	advice   func() []string
}

// NewHandler serves svc over HTTP as api/openapi.yaml describes. It does no
// authentication: wrap it with RequireBearer for a TCP listener.
func NewHandler(svc Service, opt HandlerOptions) (http.Handler, error) {
	h := &handler{svc: svc, log: opt.Logger, stopping: opt.Stopping, advice: opt.Advice}
	if h.log == nil {
		h.log = slog.New(slog.DiscardHandler)
	}
	gatherer := opt.Gatherer
	if gatherer == nil {
		gatherer = prometheus.NewRegistry()
	}

	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", h.health)
	mux.Handle("GET /metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /openapi.yaml", h.openapi)

	mux.HandleFunc("GET /instances", h.listInstances)
	adm := newAdmission(opt.MaxHeavyOps)
	mux.HandleFunc("POST /instances", adm.heavy(h.createInstance))
	mux.HandleFunc("GET /instances/{id}", h.getInstance)
	mux.HandleFunc("DELETE /instances/{id}", h.deleteInstance)
	// The literal routes below are more specific than {action}, so the mux
	// sends fork, forks and snapshots to their own handlers, never to action.
	mux.HandleFunc("POST /instances/{id}/{action}", adm.heavy(h.action))
	mux.HandleFunc("POST /instances/{id}/fork", adm.heavy(h.forkInstance))
	mux.HandleFunc("POST /instances/{id}/forks", adm.heavy(h.forkInstanceBatch))
	mux.HandleFunc("POST /instances/{id}/snapshots", adm.heavy(h.createSnapshot))

	mux.HandleFunc("GET /snapshots", h.listSnapshots)
	mux.HandleFunc("GET /snapshots/{id}", h.getSnapshot)
	mux.HandleFunc("DELETE /snapshots/{id}", h.deleteSnapshot)
	mux.HandleFunc("POST /snapshots/{id}/fork", adm.heavy(h.forkSnapshot))
	mux.HandleFunc("POST /snapshots/{id}/forks", adm.heavy(h.forkSnapshotBatch))

	mux.HandleFunc("GET /pager/stats", h.pagerStats)
	mux.HandleFunc("GET /events", h.events)

	mux.HandleFunc("GET /images", h.listImages)
	mux.HandleFunc("POST /images/pull", h.startPull)
	mux.HandleFunc("GET /images/pulls/{id}", h.getPull)
	mux.HandleFunc("POST /images/gc", h.gcImages)
	mux.HandleFunc("GET /images/{ref}", h.getImage)
	mux.HandleFunc("DELETE /images/{ref}", h.deleteImage)

	var root http.Handler = h.logRequests(h.recoverPanics(jsonNotFound{mux}))
	if opt.Registerer != nil {
		m, err := newHTTPMetrics(opt.Registerer)
		if err != nil {
			return nil, err
		}
		root = m.instrument(root)
	}
	return root, nil
}

// jsonNotFound answers unrouted requests with an error document instead of
// the mux's plain text, keeping every error {"code","message"}.
type jsonNotFound struct{ mux *http.ServeMux }

func (j jsonNotFound) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if h, pattern := j.mux.Handler(r); pattern == "" {
		// Ask the mux what it would say (404, 405 with Allow, or a redirect
		// to the clean path) without letting it write its text body.
		probe := &statusProbe{header: http.Header{}}
		h.ServeHTTP(probe, r)
		switch probe.status {
		case http.StatusMethodNotAllowed:
			w.Header().Set("Allow", probe.header.Get("Allow"))
			writeError(w, errorf(http.StatusMethodNotAllowed, CodeMethodNotAllowed,
				"%s is not allowed on %s (allowed: %s)", r.Method, r.URL.Path, probe.header.Get("Allow")))
		case http.StatusMovedPermanently, http.StatusPermanentRedirect, http.StatusFound, http.StatusTemporaryRedirect:
			h.ServeHTTP(w, r)
		default:
			writeError(w, errorf(http.StatusNotFound, CodeNotFound, "no such endpoint: %s %s", r.Method, r.URL.Path))
		}
		return
	}
	j.mux.ServeHTTP(w, r)
}

// logRequests logs every request at debug level with its route, status and
// duration (failures are also logged by fail, at their own level).
func (h *handler) logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !h.log.Enabled(r.Context(), slog.LevelDebug) {
			next.ServeHTTP(w, r)
			return
		}
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(sw, r)
		h.log.Debug("request", "method", r.Method, "path", r.URL.Path, "route", r.Pattern,
			"status", sw.status, "duration", time.Since(start))
	})
}

// recoverPanics turns a panic in a handler or the Service into a logged
// 500 error document instead of a dropped connection.
func (h *handler) recoverPanics(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				h.log.Error("panic serving request", "method", r.Method, "path", r.URL.Path, "panic", v, "stack", string(debug.Stack()))
				writeError(w, fmt.Errorf("%s %s: internal error (panic: %v)", r.Method, r.URL.Path, v))
			}
		}()
		next.ServeHTTP(w, r)
	})
}

// statusProbe is a ResponseWriter that keeps the status and headers only.
type statusProbe struct {
	header http.Header
	status int
}

func (p *statusProbe) Header() http.Header         { return p.header }
func (p *statusProbe) Write(b []byte) (int, error) { return len(b), nil }
func (p *statusProbe) WriteHeader(code int)        { p.status = code }

func (h *handler) health(w http.ResponseWriter, r *http.Request) {
	hl := Health{Status: "ok", Version: version.Version, Jailer: "none"}
	if h.advice != nil {
		hl.Advice = h.advice()
	}
	if hr, ok := h.svc.(HealthReporter); ok {
		d := hr.Health()
		hl.Jailer, hl.Warnings = d.Jailer, d.Warnings
	}
	writeJSON(w, http.StatusOK, hl)
}

func (h *handler) openapi(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/yaml")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write([]byte(apispec.OpenAPI))
}

func (h *handler) listInstances(w http.ResponseWriter, r *http.Request) {
	list, err := h.svc.ListInstances(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if list == nil {
		list = []Instance{}
	}
	writeJSON(w, http.StatusOK, list)
}

func (h *handler) createInstance(w http.ResponseWriter, r *http.Request) {
	var req CreateInstanceRequest
	if _, err := decodeBody(w, r, &req, true); err != nil {
		h.fail(w, r, err)
		return
	}
	req = req.WithDefaults()
	if err := req.Validate(); err != nil {
		h.fail(w, r, err)
		return
	}
	inst, err := h.svc.CreateInstance(r.Context(), req)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, inst)
}

func (h *handler) getInstance(w http.ResponseWriter, r *http.Request) {
	ref, ok := h.ref(w, r)
	if !ok {
		return
	}
	inst, err := h.svc.GetInstance(r.Context(), ref)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, inst)
}

func (h *handler) deleteInstance(w http.ResponseWriter, r *http.Request) {
	ref, ok := h.ref(w, r)
	if !ok {
		return
	}
	if err := h.svc.DeleteInstance(r.Context(), ref); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) action(w http.ResponseWriter, r *http.Request) {
	action := r.PathValue("action")
	if !IsAction(action) {
		h.fail(w, r, errorf(http.StatusNotFound, CodeNotFound,
			"no instance action %q; actions are %v, fork, forks and snapshots", action, Actions()))
		return
	}
	callOnRef(h, w, r, false, http.StatusOK, func(ctx context.Context, ref string, req ActionRequest) (Instance, error) {
		return h.svc.Action(ctx, ref, action, req)
	})
}

func (h *handler) forkInstance(w http.ResponseWriter, r *http.Request) {
	h.fork(w, r, h.svc.ForkInstance)
}

func (h *handler) forkSnapshot(w http.ResponseWriter, r *http.Request) {
	h.fork(w, r, h.svc.ForkSnapshot)
}

func (h *handler) fork(w http.ResponseWriter, r *http.Request,
	call func(ctx context.Context, ref string, req ForkRequest) (Instance, error)) {
	callOnRef(h, w, r, true, http.StatusCreated, call)
}

func (h *handler) forkInstanceBatch(w http.ResponseWriter, r *http.Request) {
	h.forkBatch(w, r, h.svc.ForkInstanceBatch)
}

func (h *handler) forkSnapshotBatch(w http.ResponseWriter, r *http.Request) {
	h.forkBatch(w, r, h.svc.ForkSnapshotBatch)
}

// forkBatch serves a batch of forks: one heavy operation however many forks
// it makes (the Service admits and builds them together), all or none.
func (h *handler) forkBatch(w http.ResponseWriter, r *http.Request,
	call func(ctx context.Context, ref string, req ForkBatchRequest) ([]Instance, error)) {
	callOnRef(h, w, r, true, http.StatusCreated, func(ctx context.Context, ref string, req ForkBatchRequest) (ForkBatch, error) {
		forks, err := call(ctx, ref, req)
		if forks == nil {
			forks = []Instance{}
		}
		return ForkBatch{Forks: forks}, err
	})
}

func (h *handler) createSnapshot(w http.ResponseWriter, r *http.Request) {
	callOnRef(h, w, r, true, http.StatusCreated, h.svc.CreateSnapshot)
}

// validator is a request body that checks itself.
type validator interface{ Validate() error }

// callOnRef serves a request on the instance or snapshot the path names: it
// decodes the body into a Req (a body is required, or may be empty), checks
// it, calls call, and writes what it returns with status. Any error is the
// response, and nothing is called before the body is known good.
func callOnRef[Req validator, Out any](h *handler, w http.ResponseWriter, r *http.Request, required bool, status int,
	call func(ctx context.Context, ref string, req Req) (Out, error)) {
	ref, ok := h.ref(w, r)
	if !ok {
		return
	}
	var req Req
	if _, err := decodeBody(w, r, &req, required); err != nil {
		h.fail(w, r, err)
		return
	}
	if err := req.Validate(); err != nil {
		h.fail(w, r, err)
		return
	}
	out, err := call(r.Context(), ref, req)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, status, out)
}

func (h *handler) listSnapshots(w http.ResponseWriter, r *http.Request) {
	list, err := h.svc.ListSnapshots(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if list == nil {
		list = []Snapshot{}
	}
	writeJSON(w, http.StatusOK, list)
}

func (h *handler) getSnapshot(w http.ResponseWriter, r *http.Request) {
	ref, ok := h.ref(w, r)
	if !ok {
		return
	}
	snap, err := h.svc.GetSnapshot(r.Context(), ref)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, snap)
}

func (h *handler) deleteSnapshot(w http.ResponseWriter, r *http.Request) {
	ref, ok := h.ref(w, r)
	if !ok {
		return
	}
	if err := h.svc.DeleteSnapshot(r.Context(), ref); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) pagerStats(w http.ResponseWriter, r *http.Request) {
	raw, err := h.svc.PagerStats(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if len(raw) == 0 {
		raw = json.RawMessage("{}")
	}
	if !json.Valid(raw) {
		h.fail(w, r, fmt.Errorf("pager stats: the pager returned invalid JSON"))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(raw)
}

// ref returns the {id} path value after checking it, or writes the error.
func (h *handler) ref(w http.ResponseWriter, r *http.Request) (string, bool) {
	ref := r.PathValue("id")
	if err := ValidateRef(ref); err != nil {
		h.fail(w, r, err)
		return "", false
	}
	return ref, true
}

// fail writes err as an error document; server-side failures are logged.
func (h *handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	status, _ := statusOf(err)
	if status >= 500 {
		h.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
	} else {
		h.log.Debug("request refused", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
	}
	writeError(w, err)
}

func writeError(w http.ResponseWriter, err error) {
	status, code := statusOf(err)
	writeJSON(w, status, Error{Code: code, Message: err.Error()})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	_ = enc.Encode(v) // the status is out; a failed write means the client left
}
