package api

import (
	"errors"
	"fmt"
	"net/http"
	"time"
)

// Error codes: the "code" of an error body. Each maps to one HTTP status.
const (
	CodeBadRequest           = "bad_request"            // 400: malformed JSON, unknown field, wrong type
	CodeUnauthorized         = "unauthorized"           // 401: TCP listener without the right bearer token
	CodeNotFound             = "not_found"              // 404
	CodeMethodNotAllowed     = "method_not_allowed"     // 405
	CodeInvalidState         = "invalid_state"          // 409: operation not allowed in the current state
	CodeAlreadyExists        = "already_exists"         // 409: name taken
	CodeAmbiguous            = "ambiguous_reference"    // 409: a reference that could mean two things, or a prefix where a guess is refused
	CodePoolExhausted        = "address_pool_exhausted" // 409: every address of network_cidr is taken
	CodeJailUIDsExhausted    = "jail_uids_exhausted"    // 409: every uid of jail_uid_range is held by a running VMM
	CodePortInUse            = "port_in_use"            // 409: a published host port is already taken
	CodeInsufficient         = "insufficient_resources" // 409: the host cannot hold it (memory, vcpus, running VMs, disk)
	CodeBodyTooLarge         = "body_too_large"         // 413: body over MaxBodyBytes
	CodeUnsupportedMediaType = "unsupported_media_type" // 415: body that is not application/json
	CodeInvalidName          = "invalid_name"           // 422: name or reference fails NamePattern
	CodeInvalidRequest       = "invalid_request"        // 422: well-formed but unacceptable values
	CodeInternal             = "internal"               // 500
	CodeUnavailable          = "unavailable"            // 503
	CodeInsufficientStorage  = "insufficient_storage"   // 507: the data dir's filesystem is full
	CodeShuttingDown         = "shutting_down"          // 503: the daemon is stopping and takes no new changes
	CodeBusy                 = "busy"                   // 429: too many heavy operations at once; retry after Retry-After
)

// StatusError is an error with its HTTP status and code. The handlers return
// it for what they refuse themselves; the client returns it for every error
// response, carrying the server's message. Unwrap yields the sentinel error
// of its code, so errors.Is(err, ErrNotFound) works on both sides.
type StatusError struct {
	Status  int
	Code    string
	Message string
	// RetryAfter is the response's Retry-After (a 429 busy), 0 without one.
	RetryAfter time.Duration
}

func (e *StatusError) Error() string {
	if e.Message == "" {
		return e.Code
	}
	return e.Message
}

// Unwrap returns the sentinel error of e's code (nil when it has none).
func (e *StatusError) Unwrap() error { return sentinelOf(e.Code) }

// errorf builds a StatusError.
func errorf(status int, code, format string, args ...any) *StatusError {
	return &StatusError{Status: status, Code: code, Message: fmt.Sprintf(format, args...)}
}

// statusOf maps an error to its HTTP status and code. This is the one place
// where sentinel errors become statuses; sentinelOf is its inverse.
func statusOf(err error) (int, string) {
	var se *StatusError
	switch {
	case errors.As(err, &se):
		return se.Status, se.Code
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound, CodeNotFound
	case errors.Is(err, ErrInvalidState):
		return http.StatusConflict, CodeInvalidState
	case errors.Is(err, ErrExists):
		return http.StatusConflict, CodeAlreadyExists
	case errors.Is(err, ErrAmbiguous):
		return http.StatusConflict, CodeAmbiguous
	case errors.Is(err, ErrPoolExhausted):
		return http.StatusConflict, CodePoolExhausted
	case errors.Is(err, ErrJailUIDsExhausted):
		return http.StatusConflict, CodeJailUIDsExhausted
	case errors.Is(err, ErrPortInUse):
		return http.StatusConflict, CodePortInUse
	case errors.Is(err, ErrInsufficientResources):
		return http.StatusConflict, CodeInsufficient
	case errors.Is(err, ErrInvalid):
		return http.StatusUnprocessableEntity, CodeInvalidRequest
	case errors.Is(err, ErrShuttingDown):
		return http.StatusServiceUnavailable, CodeShuttingDown
	case errors.Is(err, ErrBusy):
		return http.StatusTooManyRequests, CodeBusy
	case errors.Is(err, ErrUnavailable):
		return http.StatusServiceUnavailable, CodeUnavailable
	case errors.Is(err, ErrNoSpace):
		return http.StatusInsufficientStorage, CodeInsufficientStorage
	default:
		return http.StatusInternalServerError, CodeInternal
	}
}

// sentinelOf maps an error code back to the sentinel a Service would have
// returned, so callers of the client can use errors.Is.
func sentinelOf(code string) error {
	switch code {
	case CodeNotFound:
		return ErrNotFound
	case CodeInvalidState:
		return ErrInvalidState
	case CodeAlreadyExists:
		return ErrExists
	case CodeAmbiguous, "ambiguous": // "ambiguous": its name in earlier forkd versions
		return ErrAmbiguous
	case CodePoolExhausted:
		return ErrPoolExhausted
	case CodeJailUIDsExhausted:
		return ErrJailUIDsExhausted
	case CodePortInUse:
		return ErrPortInUse
	case CodeInsufficient:
		return ErrInsufficientResources
	case CodeInvalidName, CodeInvalidRequest, CodeBadRequest, CodeBodyTooLarge, CodeUnsupportedMediaType:
		return ErrInvalid
	case CodeUnavailable:
		return ErrUnavailable
	case CodeInsufficientStorage:
		return ErrNoSpace
	case CodeShuttingDown:
		return ErrShuttingDown
	case CodeBusy:
		return ErrBusy
	default:
		return nil
	}
}

// ErrorOf is the error document of err: what a failed request would answer,
// for a Service that reports an error inside an object (a failed pull).
func ErrorOf(err error) *Error {
	_, code := statusOf(err)
	return &Error{Code: code, Message: err.Error()}
}

// errorFromDoc is the error a client returns for an error document.
func errorFromDoc(e Error) error {
	status, _ := statusOf(sentinelOf(e.Code))
	if s := sentinelOf(e.Code); s == nil {
		status = http.StatusInternalServerError
	}
	return &StatusError{Status: status, Code: e.Code, Message: e.Message}
}

// codeOfStatus is the code for an error response whose body is not an
// error document (a proxy, a crash): the best guess from its status.
func codeOfStatus(status int) string {
	switch status {
	case http.StatusBadRequest:
		return CodeBadRequest
	case http.StatusUnauthorized:
		return CodeUnauthorized
	case http.StatusNotFound:
		return CodeNotFound
	case http.StatusMethodNotAllowed:
		return CodeMethodNotAllowed
	case http.StatusRequestEntityTooLarge:
		return CodeBodyTooLarge
	case http.StatusUnsupportedMediaType:
		return CodeUnsupportedMediaType
	case http.StatusUnprocessableEntity:
		return CodeInvalidRequest
	case http.StatusServiceUnavailable:
		return CodeUnavailable
	case http.StatusTooManyRequests:
		return CodeBusy
	case http.StatusInsufficientStorage:
		return CodeInsufficientStorage
	default:
		return CodeInternal
	}
}
