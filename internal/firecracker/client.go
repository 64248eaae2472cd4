package firecracker

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
	"strings"
	"sync"
	"time"
)

// Timeouts bound each API call on top of the caller's ctx. Snapshot create
// and load move guest RAM (GiBs at worst), so they get their own, longer bound.
type Timeouts struct {
	Call     time.Duration // every call but snapshot create/load; default 10 s
	Snapshot time.Duration // PUT /snapshot/create and /snapshot/load; default 10 min
}

// Default bounds of NewClient.
const (
	defaultCallTimeout     = 10 * time.Second
	defaultSnapshotTimeout = 10 * time.Minute
)

// maxErrorBody caps how much of an error body is kept in an APIError.
const maxErrorBody = 8 << 10

// A VMM may be hostile (a guest that escaped into it), so the daemon reads
// no more of its answers than Firecracker ever sends: its largest, GET
// /vm/config, is a few KiB. An answer over maxAnswerBody is refused, not
// read; headers over maxAnswerHeader fail the call.
const (
	maxAnswerBody   = 1 << 20
	maxAnswerHeader = 64 << 10
)

// Client speaks Firecracker's HTTP API over one VMM's Unix socket. It is
// safe for concurrent use; Firecracker serves one request at a time, so
// concurrent calls queue in the VMM.
type Client struct {
	apiSock  string
	http     *http.Client
	timeouts Timeouts

	vmu     sync.Mutex // guards version
	version Version    // the VMM's release; zero until known
}

// NewClient returns a client of the VMM listening on apiSock. It does not
// connect until the first call. It learns the VMM's version (GET /version)
// before the first request whose fields depend on it; a client from
// Process.Client already knows it.
func NewClient(apiSock string) *Client {
	return newClient(apiSock, Timeouts{Call: defaultCallTimeout, Snapshot: defaultSnapshotTimeout})
}

// NewClientVersion is NewClient for a VMM whose version is already known
// (zero: ask it when needed).
func NewClientVersion(apiSock string, v Version) *Client {
	c := NewClient(apiSock)
	c.version = v
	return c
}

func newClient(apiSock string, t Timeouts) *Client {
	transport := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialUnix(ctx, apiSock)
		},
		MaxIdleConns:           2,
		MaxIdleConnsPerHost:    2,
		IdleConnTimeout:        30 * time.Second,
		DisableCompression:     true,
		MaxResponseHeaderBytes: maxAnswerHeader,
	}
	return &Client{apiSock: apiSock, http: &http.Client{Transport: transport}, timeouts: t}
}

// WithTimeouts returns a client of the same socket with other bounds; zero
// fields keep the defaults.
func (c *Client) WithTimeouts(t Timeouts) *Client {
	if t.Call <= 0 {
		t.Call = defaultCallTimeout
	}
	if t.Snapshot <= 0 {
		t.Snapshot = defaultSnapshotTimeout
	}
	n := newClient(c.apiSock, t)
	c.vmu.Lock()
	n.version = c.version
	c.vmu.Unlock()
	return n
}

// APISock is the socket this client talks to.
func (c *Client) APISock() string { return c.apiSock }

// Close drops idle connections. The client stays usable.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// Describe is GET /: the VMM's identity and VM state.
func (c *Client) Describe(ctx context.Context) (InstanceInfo, error) {
	var info InstanceInfo
	err := c.do(ctx, c.timeouts.Call, http.MethodGet, "/", nil, &info)
	return info, err
}

// GetVersion is GET /version: the release the VMM reports, unparsed.
func (c *Client) GetVersion(ctx context.Context) (string, error) {
	var v VersionInfo
	if err := c.do(ctx, c.timeouts.Call, http.MethodGet, "/version", nil, &v); err != nil {
		return "", err
	}
	if v.FirecrackerVersion == "" {
		return "", fmt.Errorf("%w: GET /version on %s answered without firecracker_version", ErrUnsupportedVersion, c.apiSock)
	}
	return v.FirecrackerVersion, nil
}

// Version is the VMM's release: the one this client was made with, else
// asked once with GET /version and remembered.
func (c *Client) Version(ctx context.Context) (Version, error) {
	c.vmu.Lock()
	v := c.version
	c.vmu.Unlock()
	if !v.IsZero() {
		return v, nil
	}
	s, err := c.GetVersion(ctx)
	if err != nil {
		return Version{}, err
	}
	if v, err = ParseVersion(s); err != nil {
		return Version{}, fmt.Errorf("firecracker GET /version on %s: %w", c.apiSock, err)
	}
	c.vmu.Lock()
	c.version = v
	c.vmu.Unlock()
	return v, nil
}

// PutMachineConfig is PUT /machine-config (before boot).
func (c *Client) PutMachineConfig(ctx context.Context, mc MachineConfig) error {
	return c.do(ctx, c.timeouts.Call, http.MethodPut, "/machine-config", mc, nil)
}

// PutBootSource is PUT /boot-source (before boot).
func (c *Client) PutBootSource(ctx context.Context, bs BootSource) error {
	return c.do(ctx, c.timeouts.Call, http.MethodPut, "/boot-source", bs, nil)
}

// PutDrive is PUT /drives/{drive_id} (before boot).
func (c *Client) PutDrive(ctx context.Context, d Drive) error {
	if d.DriveID == "" {
		return fmt.Errorf("firecracker put drive: empty drive_id")
	}
	return c.do(ctx, c.timeouts.Call, http.MethodPut, "/drives/"+url.PathEscape(d.DriveID), d, nil)
}

// PutNetworkInterface is PUT /network-interfaces/{iface_id} (before boot).
func (c *Client) PutNetworkInterface(ctx context.Context, n NetworkInterface) error {
	if n.IfaceID == "" {
		return fmt.Errorf("firecracker put network interface: empty iface_id")
	}
	if n.MTU != 0 {
		v, err := c.Version(ctx)
		if err != nil {
			return err
		}
		if err := requireFeature(v, FeatureNetworkMTU); err != nil {
			return fmt.Errorf("firecracker put network interface %s: %w", n.IfaceID, err)
		}
	}
	return c.do(ctx, c.timeouts.Call, http.MethodPut, "/network-interfaces/"+url.PathEscape(n.IfaceID), n, nil)
}

// PutVsock is PUT /vsock (before boot).
func (c *Client) PutVsock(ctx context.Context, v Vsock) error {
	return c.do(ctx, c.timeouts.Call, http.MethodPut, "/vsock", v, nil)
}

type action struct {
	ActionType string `json:"action_type"`
}

// StartInstance is PUT /actions {InstanceStart}: boot the configured VM.
func (c *Client) StartInstance(ctx context.Context) error {
	return c.do(ctx, c.timeouts.Call, http.MethodPut, "/actions", action{"InstanceStart"}, nil)
}

// SendCtrlAltDel is PUT /actions {SendCtrlAltDel}: ask the guest to shut down.
func (c *Client) SendCtrlAltDel(ctx context.Context) error {
	return c.do(ctx, c.timeouts.Call, http.MethodPut, "/actions", action{"SendCtrlAltDel"}, nil)
}

type vmState struct {
	State string `json:"state"`
}

// Pause is PATCH /vm {Paused}. Idempotent in Firecracker.
func (c *Client) Pause(ctx context.Context) error {
	return c.do(ctx, c.timeouts.Call, http.MethodPatch, "/vm", vmState{"Paused"}, nil)
}

// Resume is PATCH /vm {Resumed}. Idempotent in Firecracker.
func (c *Client) Resume(ctx context.Context) error {
	return c.do(ctx, c.timeouts.Call, http.MethodPatch, "/vm", vmState{"Resumed"}, nil)
}

// CreateSnapshot is PUT /snapshot/create. The VM must be Paused. Note that
// Firecracker writes an existing mem-file of the right size in place: the
// caller must make sure nobody else maps that inode.
func (c *Client) CreateSnapshot(ctx context.Context, s SnapshotCreate) error {
	return c.do(ctx, c.timeouts.Snapshot, http.MethodPut, "/snapshot/create", s, nil)
}

// LoadSnapshot is PUT /snapshot/load, on a fresh VMM process only, with
// the fields of the VMM's version (SnapshotLoad.loadBody).
func (c *Client) LoadSnapshot(ctx context.Context, s SnapshotLoad) error {
	v, err := c.Version(ctx)
	if err != nil {
		return err
	}
	body, err := s.loadBody(v)
	if err != nil {
		return fmt.Errorf("firecracker PUT /snapshot/load: %w", err)
	}
	return c.do(ctx, c.timeouts.Snapshot, http.MethodPut, "/snapshot/load", body, nil)
}

// Guest is GET /guest, served only by the emulator. From a VMM without it (a
// real Firecracker answers 400 or 404) the error wraps ErrNotSupported and
// the *APIError.
func (c *Client) Guest(ctx context.Context) (GuestStatus, error) {
	var g GuestStatus
	err := c.do(ctx, c.timeouts.Call, http.MethodGet, "/guest", nil, &g)
	var apiErr *APIError
	if errors.As(err, &apiErr) && (apiErr.Status == http.StatusNotFound || apiErr.Status == http.StatusBadRequest) {
		return GuestStatus{}, fmt.Errorf("%w: %w", ErrNotSupported, apiErr)
	}
	return g, err
}

// do sends one request with a JSON body (when in != nil) and decodes a JSON
// answer into out (when out != nil and the VMM sent a body).
func (c *Client) do(ctx context.Context, timeout time.Duration, method, path string, in, out any) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("firecracker %s %s: encode body: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	// The host part is ignored (we dial the socket) but must be valid.
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, body)
	if err != nil {
		return fmt.Errorf("firecracker %s %s: %w", method, path, err)
	}
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker %s %s on %s: %w", method, path, c.apiSock, err)
	}
	defer resp.Body.Close()

	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		raw, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
		return &APIError{Method: method, Path: path, Status: resp.StatusCode, FaultMessage: faultMessage(raw)}
	}
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswerBody+1))
	if err != nil {
		return fmt.Errorf("firecracker %s %s: read answer: %w", method, path, err)
	}
	if len(raw) > maxAnswerBody {
		return fmt.Errorf("firecracker %s %s on %s: answer over %d bytes: no Firecracker answer is that large; refused", method, path, c.apiSock, maxAnswerBody)
	}
	if out == nil || len(bytes.TrimSpace(raw)) == 0 {
		if out != nil && resp.StatusCode != http.StatusNoContent {
			return fmt.Errorf("firecracker %s %s: HTTP %d with an empty body", method, path, resp.StatusCode)
		}
		return nil
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("firecracker %s %s: decode answer %q: %w", method, path, truncate(raw, 200), err)
	}
	return nil
}

// faultMessage extracts Firecracker's {"fault_message": "..."}; any other
// body is returned as text so the caller still sees what the VMM said.
func faultMessage(raw []byte) string {
	var fault struct {
		FaultMessage *string `json:"fault_message"`
	}
	if json.Unmarshal(raw, &fault) == nil && fault.FaultMessage != nil {
		return *fault.FaultMessage
	}
	return strings.TrimSpace(truncate(raw, 1024))
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n]) + "..."
	}
	return string(b)
}
