package pager

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/forkd/forkd/internal/prefetch"
)

// Client talks to a pager's control API over its Unix socket.
type Client struct {
	sock string
	http *http.Client
}

// NewClient returns a client of the pager listening on controlSock.
func NewClient(controlSock string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", controlSock)
		},
		MaxIdleConns:    4,
		IdleConnTimeout: 30 * time.Second,
	}
	return &Client{sock: controlSock, http: &http.Client{Transport: tr}}
}

// Socket is the control socket this client talks to.
func (c *Client) Socket() string { return c.sock }

// APIError is a non-2xx answer of the pager.
type APIError struct {
	Method, Path string
	Status       int
	Code         string
	Message      string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("pager %s %s: %d %s: %s", e.Method, e.Path, e.Status, e.Code, e.Message)
}

// Health is GET /health.
func (c *Client) Health(ctx context.Context) (Health, error) {
	var h Health
	err := c.do(ctx, http.MethodGet, "/health", nil, &h)
	return h, err
}

// CreateSession asks the pager for a session; when it returns, the pager
// listens on Session.SocketPath (the Uffd backend_path to give the VMM).
func (c *Client) CreateSession(ctx context.Context, req SessionRequest) (Session, error) {
	var s Session
	err := c.do(ctx, http.MethodPost, "/sessions", req, &s)
	return s, err
}

// Session is GET /sessions/{id}: one session's state and counters. A
// session the pager does not have (never created here, or ended and freed)
// is an error for which IsNotFound is true.
func (c *Client) Session(ctx context.Context, id string) (SessionInfo, error) {
	var s SessionInfo
	err := c.do(ctx, http.MethodGet, "/sessions/"+url.PathEscape(id), nil, &s)
	return s, err
}

// Recording is GET /sessions/{id}/recording: the first faults so far of a
// session created with RecordPages, as a working-set recording of its
// cache key.
func (c *Client) Recording(ctx context.Context, id string) (prefetch.Recording, error) {
	var raw []byte
	if err := c.do(ctx, http.MethodGet, "/sessions/"+url.PathEscape(id)+"/recording", nil, &raw); err != nil {
		return prefetch.Recording{}, err
	}
	rec, err := prefetch.Decode(raw)
	if err != nil {
		return prefetch.Recording{}, fmt.Errorf("pager GET /sessions/%s/recording: %w", id, err)
	}
	return rec, nil
}

// DeleteSession ends a session (its VMM can no longer fault pages in). It
// is idempotent: a session that already ended (its VMM exited, or it was
// deleted before) is not an error.
func (c *Client) DeleteSession(ctx context.Context, id string) error {
	err := c.do(ctx, http.MethodDelete, "/sessions/"+id, nil, nil)
	if IsNotFound(err) {
		return nil
	}
	return err
}

// IsNotFound reports whether err is the pager's 404 (no such session).
func IsNotFound(err error) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Status == http.StatusNotFound
}

// Populate faults in every page the VMM does not have yet and unregisters
// its memory, so the VM no longer needs the pager. It returns when done.
func (c *Client) Populate(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodPost, "/sessions/"+id+"/populate", nil, nil)
}

// Stats is GET /stats.
func (c *Client) Stats(ctx context.Context) (Stats, error) {
	var s Stats
	err := c.do(ctx, http.MethodGet, "/stats", nil, &s)
	return s, err
}

// StatsRaw is GET /stats as the pager sent it.
func (c *Client) StatsRaw(ctx context.Context) (json.RawMessage, error) {
	var raw json.RawMessage
	err := c.do(ctx, http.MethodGet, "/stats", nil, &raw)
	return raw, err
}

// Drain makes the pager refuse new sessions and exit after the last one.
func (c *Client) Drain(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, "/drain", nil, nil)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("pager %s %s: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://pager"+path, body)
	if err != nil {
		return fmt.Errorf("pager %s %s: %w", method, path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("pager %s %s on %s: %w", method, path, c.sock, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("pager %s %s: read reply: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		e := &APIError{Method: method, Path: path, Status: resp.StatusCode}
		var ae apiError
		if json.Unmarshal(data, &ae) == nil && ae.Code != "" {
			e.Code, e.Message = ae.Code, ae.Message
		} else {
			e.Message = string(bytes.TrimSpace(data))
		}
		return e
	}
	if raw, ok := out.(*[]byte); ok {
		*raw = data
		return nil
	}
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("pager %s %s: decode reply: %w", method, path, err)
		}
	}
	return nil
}
