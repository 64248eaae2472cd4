package pager

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
)

// routes is the control API (docs/architecture.md §8).
func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.health())
	})
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Stats())
	})
	mux.HandleFunc("POST /sessions", func(w http.ResponseWriter, r *http.Request) {
		var req SessionRequest
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			writeError(w, errors.Join(errInvalid, err))
			return
		}
		sess, err := s.createSession(req)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusCreated, sess)
	})
	mux.HandleFunc("GET /sessions/{id}", func(w http.ResponseWriter, r *http.Request) {
		// One session's state and counters: a liveness check of one VM's
		// session costs this, not every session's counters from /stats.
		info, err := s.sessionInfo(r.PathValue("id"))
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, info)
	})
	mux.HandleFunc("GET /sessions/{id}/recording", func(w http.ResponseWriter, r *http.Request) {
		// The first faults so far of a session created with record_pages,
		// as a working-set recording file (internal/prefetch).
		b, err := s.sessionRecording(r.PathValue("id"))
		if err != nil {
			writeError(w, err)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(b)
	})
	mux.HandleFunc("DELETE /sessions/{id}", func(w http.ResponseWriter, r *http.Request) {
		if err := s.deleteSession(r.Context(), r.PathValue("id")); err != nil {
			writeError(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /sessions/{id}/populate", func(w http.ResponseWriter, r *http.Request) {
		if err := s.populate(r.Context(), r.PathValue("id")); err != nil {
			writeError(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /drain", func(w http.ResponseWriter, r *http.Request) {
		s.Drain()
		writeJSON(w, http.StatusAccepted, s.health())
	})
	return mux
}

// apiError is the error body: {"code": "...", "message": "..."}.
type apiError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// writeError maps an error to its status: the one place that does.
func writeError(w http.ResponseWriter, err error) {
	status, code := http.StatusInternalServerError, "internal"
	switch {
	case errors.Is(err, errInvalid):
		status, code = http.StatusBadRequest, "invalid"
	case errors.Is(err, errNotFound):
		status, code = http.StatusNotFound, "not_found"
	case errors.Is(err, errExists):
		status, code = http.StatusConflict, "exists"
	case errors.Is(err, errConflict):
		status, code = http.StatusConflict, "invalid_state"
	case errors.Is(err, errDraining):
		status, code = http.StatusServiceUnavailable, "unavailable"
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		status, code = http.StatusServiceUnavailable, "unavailable"
	}
	writeJSON(w, status, apiError{Code: code, Message: err.Error()})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}
