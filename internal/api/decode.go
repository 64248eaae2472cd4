package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
)

// MaxBodyBytes bounds every request body: nothing forkd accepts is near it.
const MaxBodyBytes = 1 << 20

// decodeBody reads r's body strictly into dst: at most MaxBodyBytes,
// application/json, one JSON value with no unknown fields and nothing after
// it. An empty body is an error when required and leaves dst as is when not.
// It reports (present, err).
func decodeBody(w http.ResponseWriter, r *http.Request, dst any, required bool) (bool, error) {
	if r.ContentLength > MaxBodyBytes {
		return false, errorf(http.StatusRequestEntityTooLarge, CodeBodyTooLarge,
			"request body is %d bytes; the limit is %d", r.ContentLength, MaxBodyBytes)
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return false, errorf(http.StatusRequestEntityTooLarge, CodeBodyTooLarge,
				"request body exceeds the limit of %d bytes", MaxBodyBytes)
		}
		return false, errorf(http.StatusBadRequest, CodeBadRequest, "read request body: %v", err)
	}
	if len(bytes.TrimSpace(body)) == 0 {
		if required {
			return false, errorf(http.StatusBadRequest, CodeBadRequest, "request body is required (a JSON object)")
		}
		return false, nil
	}
	if err := checkJSONContentType(r.Header.Get("Content-Type")); err != nil {
		return false, err
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil {
		return false, errorf(http.StatusBadRequest, CodeBadRequest, "invalid JSON body: %s", describeJSONError(err))
	}
	// One value only: trailing data means the client and server disagree on
	// what was sent, so refuse rather than guess.
	if err := dec.Decode(&json.RawMessage{}); err != io.EOF {
		return false, errorf(http.StatusBadRequest, CodeBadRequest, "invalid JSON body: data after the first JSON value")
	}
	return true, nil
}

func checkJSONContentType(ct string) error {
	if ct == "" {
		return errorf(http.StatusUnsupportedMediaType, CodeUnsupportedMediaType,
			"request body needs Content-Type: application/json")
	}
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil || mt != "application/json" {
		return errorf(http.StatusUnsupportedMediaType, CodeUnsupportedMediaType,
			"Content-Type %q is not supported; send application/json", ct)
	}
	return nil
}

func describeJSONError(err error) string {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syn):
		return fmt.Sprintf("malformed JSON at byte %d: %v", syn.Offset, syn)
	case errors.As(err, &typ):
		if typ.Field != "" {
			return fmt.Sprintf("field %q must be %s, got JSON %s", typ.Field, typ.Type, typ.Value)
		}
		return fmt.Sprintf("body must be a JSON object, got JSON %s", typ.Value)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "truncated JSON"
	default:
		return err.Error() // e.g. `json: unknown field "x"`
	}
}
