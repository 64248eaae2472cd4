package firecracker

import (
	"errors"
	"fmt"
)

// ErrNotSupported is wrapped by calls the VMM does not serve, such as
// Guest on a real Firecracker.
var ErrNotSupported = errors.New("not supported by this VMM")

// APIError is a non-2xx answer of the VMM's API. FaultMessage is
// Firecracker's {"fault_message"}, or the raw body when it is not that JSON.
type APIError struct {
	Method, Path string
	Status       int
	FaultMessage string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("firecracker %s %s: HTTP %d: %s", e.Method, e.Path, e.Status, e.FaultMessage)
}
