package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Client is the typed client of the daemon's API. It implements Service, so
// code written against a Service can run against a remote daemon. Errors
// from the daemon are *StatusError carrying the server's message and
// unwrapping to the sentinel errors (errors.Is(err, ErrNotFound)); failures
// to reach the daemon are *ConnectError.
type Client struct {
	host  string       // as given, for messages
	base  string       // URL prefix, "http://forkd" for a socket
	token string       // bearer token; "" sends none
	hc    *http.Client // no overall timeout: lifecycle calls are synchronous; ctx bounds them
}

var _ Service = (*Client)(nil)

// ClientOption configures a Client.
type ClientOption func(*Client)

// WithToken sends "Authorization: Bearer token" (needed on TCP listeners).
func WithToken(token string) ClientOption {
	return func(c *Client) { c.token = strings.TrimSpace(token) }
}

// WithRootCAs makes an https:// client trust the certificates of pool (a
// daemon's self-signed or private-CA certificate) instead of the system's.
func WithRootCAs(pool *x509.CertPool) ClientOption {
	return func(c *Client) {
		if tr, ok := c.hc.Transport.(*http.Transport); ok && tr.TLSClientConfig != nil {
			tr.TLSClientConfig.RootCAs = pool
		}
	}
}

// ConnectError means the daemon could not be reached at all.
type ConnectError struct {
	Host string
	Err  error
}

func (e *ConnectError) Error() string {
	return fmt.Sprintf("cannot reach the forkd daemon at %s: %v", e.Host, e.Err)
}

func (e *ConnectError) Unwrap() error { return e.Err }

// NewClient returns a client of the daemon at host: a Unix socket path,
// unix://PATH, tcp://HOST:PORT (plain HTTP), or https://HOST:PORT (a TCP
// listener with tls_cert/tls_key).
func NewClient(host string, opts ...ClientOption) (*Client, error) {
	c := &Client{host: host}
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	tr := &http.Transport{
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       30 * time.Second,
		ResponseHeaderTimeout: 0, // actions run as long as they take
	}
	switch {
	case host == "":
		return nil, fmt.Errorf("forkd client: empty host")
	case strings.HasPrefix(host, "tcp://"), strings.HasPrefix(host, "http://"):
		_, addr, _ := strings.Cut(host, "://")
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return nil, fmt.Errorf("forkd client: host %q: want tcp://HOST:PORT: %w", host, err)
		}
		c.base = "http://" + addr
		tr.DialContext = dialer.DialContext
	case strings.HasPrefix(host, "https://"):
		addr := strings.TrimPrefix(host, "https://")
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return nil, fmt.Errorf("forkd client: host %q: want https://HOST:PORT: %w", host, err)
		}
		c.base = "https://" + addr
		tr.DialContext = dialer.DialContext
		tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	case strings.Contains(host, "://") && !strings.HasPrefix(host, "unix://"):
		return nil, fmt.Errorf("forkd client: host %q: want a socket path, unix://PATH, tcp://HOST:PORT or https://HOST:PORT", host)
	default:
		path := strings.TrimPrefix(host, "unix://")
		c.base = "http://forkd"
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, "unix", path)
		}
	}
	c.hc = &http.Client{Transport: tr}
	for _, o := range opts {
		o(c)
	}
	return c, nil
}

// Host is the host the client was made for.
func (c *Client) Host() string { return c.host }

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

// Health calls GET /health.
func (c *Client) Health(ctx context.Context) (Health, error) {
	var h Health
	err := c.do(ctx, http.MethodGet, "/health", nil, &h, http.StatusOK)
	return h, err
}

// ErrDaemonExited is returned by WaitHealthy when the daemon process it
// waits for has exited.
var ErrDaemonExited = errors.New("the daemon exited during startup")

// WaitHealthy polls GET /health until the daemon answers, ctx ends, or
// exited (the daemon process's exit, if the caller started it; may be nil)
// is closed. Everything that starts a daemon and then drives it (the demo,
// the benchmark, the reliability suite) waits through this.
func (c *Client) WaitHealthy(ctx context.Context, exited <-chan struct{}) (Health, error) {
	for {
		hctx, cancel := context.WithTimeout(ctx, time.Second)
		h, err := c.Health(hctx)
		cancel()
		if err == nil {
			return h, nil
		}
		select {
		case <-exited:
			return Health{}, ErrDaemonExited
		case <-ctx.Done():
			return Health{}, fmt.Errorf("the daemon did not answer on %s: %w (last: %v)", c.host, ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Metrics returns GET /metrics (Prometheus text).
func (c *Client) Metrics(ctx context.Context) (string, error) {
	b, err := c.raw(ctx, "/metrics")
	return string(b), err
}

// OpenAPI returns the daemon's GET /openapi.yaml.
func (c *Client) OpenAPI(ctx context.Context) ([]byte, error) { return c.raw(ctx, "/openapi.yaml") }

func (c *Client) CreateInstance(ctx context.Context, req CreateInstanceRequest) (Instance, error) {
	var inst Instance
	err := c.do(ctx, http.MethodPost, "/instances", req, &inst, http.StatusCreated)
	return inst, err
}

func (c *Client) ListInstances(ctx context.Context) ([]Instance, error) {
	var list []Instance
	err := c.do(ctx, http.MethodGet, "/instances", nil, &list, http.StatusOK)
	return list, err
}

func (c *Client) GetInstance(ctx context.Context, ref string) (Instance, error) {
	var inst Instance
	err := c.do(ctx, http.MethodGet, "/instances/"+url.PathEscape(ref), nil, &inst, http.StatusOK)
	return inst, err
}

func (c *Client) DeleteInstance(ctx context.Context, ref string) error {
	return c.do(ctx, http.MethodDelete, "/instances/"+url.PathEscape(ref), nil, nil, http.StatusNoContent)
}

func (c *Client) Action(ctx context.Context, ref, action string, req ActionRequest) (Instance, error) {
	var inst Instance
	var body any
	if req != (ActionRequest{}) {
		body = req
	}
	err := c.do(ctx, http.MethodPost, "/instances/"+url.PathEscape(ref)+"/"+url.PathEscape(action), body, &inst, http.StatusOK)
	return inst, err
}

func (c *Client) ForkInstance(ctx context.Context, ref string, req ForkRequest) (Instance, error) {
	var inst Instance
	err := c.do(ctx, http.MethodPost, "/instances/"+url.PathEscape(ref)+"/fork", req, &inst, http.StatusCreated)
	return inst, err
}

func (c *Client) CreateSnapshot(ctx context.Context, ref string, req SnapshotRequest) (Snapshot, error) {
	var s Snapshot
	err := c.do(ctx, http.MethodPost, "/instances/"+url.PathEscape(ref)+"/snapshots", req, &s, http.StatusCreated)
	return s, err
}

func (c *Client) ListSnapshots(ctx context.Context) ([]Snapshot, error) {
	var list []Snapshot
	err := c.do(ctx, http.MethodGet, "/snapshots", nil, &list, http.StatusOK)
	return list, err
}

func (c *Client) GetSnapshot(ctx context.Context, ref string) (Snapshot, error) {
	var s Snapshot
	err := c.do(ctx, http.MethodGet, "/snapshots/"+url.PathEscape(ref), nil, &s, http.StatusOK)
	return s, err
}

func (c *Client) DeleteSnapshot(ctx context.Context, ref string) error {
	return c.do(ctx, http.MethodDelete, "/snapshots/"+url.PathEscape(ref), nil, nil, http.StatusNoContent)
}

func (c *Client) ForkSnapshot(ctx context.Context, ref string, req ForkRequest) (Instance, error) {
	var inst Instance
	err := c.do(ctx, http.MethodPost, "/snapshots/"+url.PathEscape(ref)+"/fork", req, &inst, http.StatusCreated)
	return inst, err
}

func (c *Client) ForkInstanceBatch(ctx context.Context, ref string, req ForkBatchRequest) ([]Instance, error) {
	var b ForkBatch
	err := c.do(ctx, http.MethodPost, "/instances/"+url.PathEscape(ref)+"/forks", req, &b, http.StatusCreated)
	return b.Forks, err
}

func (c *Client) ForkSnapshotBatch(ctx context.Context, ref string, req ForkBatchRequest) ([]Instance, error) {
	var b ForkBatch
	err := c.do(ctx, http.MethodPost, "/snapshots/"+url.PathEscape(ref)+"/forks", req, &b, http.StatusCreated)
	return b.Forks, err
}

func (c *Client) PagerStats(ctx context.Context) (json.RawMessage, error) {
	var raw json.RawMessage
	err := c.do(ctx, http.MethodGet, "/pager/stats", nil, &raw, http.StatusOK)
	return raw, err
}

// do sends one request and decodes a `want` response into out, or returns
// the error the daemon answered with.
func (c *Client) do(ctx context.Context, method, path string, in, out any, want int) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("%s %s: encode request: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	resp, err := c.send(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != want {
		return readError(resp)
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decode response: %w", method, path, err)
	}
	return nil
}

func (c *Client) raw(ctx context.Context, path string) ([]byte, error) {
	resp, err := c.send(ctx, http.MethodGet, path, nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, readError(resp)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("GET %s: read response: %w", path, err)
	}
	return b, nil
}

func (c *Client) send(ctx context.Context, method, path string, body io.Reader) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, fmt.Errorf("%s %s: %w", method, path, ctxErr)
		}
		var opErr *net.OpError
		if errors.As(err, &opErr) && opErr.Op == "dial" {
			return nil, &ConnectError{Host: c.host, Err: opErr.Err}
		}
		return nil, fmt.Errorf("%s %s on %s: %w", method, path, c.host, err)
	}
	return resp, nil
}

// readError turns an error response into a *StatusError.
func readError(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, MaxBodyBytes))
	var e Error
	var retry time.Duration
	if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s >= 0 {
		retry = time.Duration(s) * time.Second
	}
	if err := json.Unmarshal(b, &e); err == nil && e.Code != "" {
		return &StatusError{Status: resp.StatusCode, Code: e.Code, Message: e.Message, RetryAfter: retry}
	}
	msg := strings.TrimSpace(string(b))
	if msg == "" {
		msg = resp.Status
	}
	return &StatusError{Status: resp.StatusCode, Code: codeOfStatus(resp.StatusCode), Message: msg, RetryAfter: retry}
}

// EventStream reads GET /events (newline-delimited JSON) and calls fn for
// each event until ctx ends (nil), fn returns an error (that error), or the
// stream ends: ErrStreamEnded when the daemon closed it (it stops, or the
// client fell too far behind), or the transport's error.
func (c *Client) EventStream(ctx context.Context, fn func(Event) error) error {
	body, err := c.openEvents(ctx)
	if err != nil {
		return err
	}
	return readEvents(ctx, body, fn)
}

// Events is EventStream as a channel, for the Service interface: a refused
// request is its error, and the channel closes when the stream ends for
// any reason.
func (c *Client) Events(ctx context.Context) (<-chan Event, error) {
	body, err := c.openEvents(ctx)
	if err != nil {
		return nil, err
	}
	ch := make(chan Event)
	go func() {
		defer close(ch)
		readEvents(ctx, body, func(ev Event) error {
			select {
			case ch <- ev:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	}()
	return ch, nil
}

// ErrStreamEnded is EventStream's error when the daemon ended the stream.
var ErrStreamEnded = errors.New("the daemon ended the event stream")

func (c *Client) openEvents(ctx context.Context) (io.ReadCloser, error) {
	resp, err := c.send(ctx, http.MethodGet, "/events", nil)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		return nil, readError(resp)
	}
	return resp.Body, nil
}

// readEvents decodes body's events into fn and closes body.
func readEvents(ctx context.Context, body io.ReadCloser, fn func(Event) error) error {
	defer body.Close()
	dec := json.NewDecoder(body)
	for {
		var ev Event
		if err := dec.Decode(&ev); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, io.EOF) {
				return ErrStreamEnded
			}
			return fmt.Errorf("GET /events: %w", err)
		}
		if err := fn(ev); err != nil {
			return err
		}
	}
}
