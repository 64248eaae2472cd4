package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/datadir"
	"github.com/forkd/forkd/internal/version"
)

// Backend is the instance manager as the daemon sees it.
type Backend interface {
	api.Service
	// Close releases the backend's resources. It must not stop VMs.
	Close() error
}

// backendFactory builds the Backend; newBackend in production, a test
// double in this package's tests.
type backendFactory func(ctx context.Context, cfg Config, log *slog.Logger, reg prometheus.Registerer) (Backend, error)

// defaultShutdownGrace is shutdown_grace when the Config leaves it zero.
const defaultShutdownGrace = 60 * time.Second

// ErrGraceExpired is what Run returns when operations were still running at
// the end of the shutdown grace period: the daemon stops anyway, without
// closing the store under them, and the next start's reconciler finishes
// or rolls back what their journal entries say.
var ErrGraceExpired = errors.New("shutdown grace period expired with operations in flight")

// Run runs the daemon until ctx is cancelled (the serve command cancels it
// on SIGTERM/SIGINT), then shuts down gracefully.
func Run(ctx context.Context, cfg Config) error {
	log, err := NewLogger(os.Stderr, cfg.LogFormat, cfg.LogLevel)
	if err != nil {
		return err
	}
	d, err := start(ctx, cfg, log, newBackend)
	if err != nil {
		return err
	}
	return d.wait(ctx)
}

// daemon is one running daemon.
type daemon struct {
	cfg     Config
	log     *slog.Logger
	lock    *os.File
	backend Backend
	// gate admits mutating requests and counts them, so shutdown can refuse
	// new ones and wait for those in flight.
	gate      *api.Gate
	servers   []*http.Server
	listeners []net.Listener
	stopping  atomic.Bool // close has begun: a listener's end is not a failure
	socket    string
	tcp       net.Addr   // nil without --listen
	errc      chan error // a server that stopped on its own
}

// start prepares the data dir, builds the backend and starts serving. On
// error everything it set up is released.
func start(ctx context.Context, cfg Config, log *slog.Logger, factory backendFactory) (_ *daemon, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	// Nobody but the daemon's uid may be able to plant anything in the
	// data dir or swap it for a symlink: refuse, never fix silently.
	if err := datadir.CheckAncestors(cfg.DataDir); err != nil {
		return nil, err
	}
	if err := datadir.Check(cfg.DataDir); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	// Instance state, sockets and guest memory live here: owner only.
	if err := os.Chmod(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("chmod data dir: %w", err)
	}
	d := &daemon{cfg: cfg, log: log, socket: filepath.Join(cfg.DataDir, api.SocketName), errc: make(chan error, 2), gate: api.NewGate()}
	defer func() {
		if err != nil {
			d.close(context.Background())
		}
	}()
	if d.lock, err = lockDataDir(cfg.DataDir); err != nil {
		return nil, err
	}

	var token string
	var tlsConf *tls.Config
	if cfg.Listen != "" {
		if token, err = readToken(cfg.TokenFile); err != nil {
			return nil, err
		}
		if tlsConf, err = loadTLS(cfg); err != nil {
			return nil, err
		}
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "forkd_build_info",
			Help:        "Always 1; the version label says which forkd is running.",
			ConstLabels: prometheus.Labels{"version": version.Version},
		}, func() float64 { return 1 }),
	)
	if d.backend, err = factory(ctx, cfg, log, reg); err != nil {
		return nil, fmt.Errorf("start backend: %w", err)
	}
	var advice func() []string
	if a, ok := d.backend.(interface{ Advice() []string }); ok {
		advice = a.Advice
	}
	handler, err := api.NewHandler(d.backend, api.HandlerOptions{Advice: advice, Registerer: reg, Gatherer: reg, Logger: log, Stopping: d.gate.Closing(),
		MaxHeavyOps: cfg.MaxHeavyOps})
	if err != nil {
		return nil, err
	}
	handler = d.gate.Wrap(handler)

	uln, err := listenUnix(ctx, d.socket)
	if err != nil {
		return nil, err
	}
	d.serve(uln, handler)
	if cfg.Listen != "" {
		addr, _ := tcpAddr(cfg.Listen)
		tln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("listen %s: %w", cfg.Listen, err)
		}
		d.tcp = tln.Addr()
		guarded, err := api.RequireBearer(token, handler, api.BearerOptions{Logger: log, Registerer: reg})
		if err != nil {
			tln.Close()
			return nil, err
		}
		if tlsConf != nil {
			tln = tls.NewListener(tln, tlsConf)
		} else if !cfg.LoopbackListen() {
			log.Warn("listen_insecure: serving the API and its bearer token over plain HTTP on a non-loopback address", "listen", cfg.Listen)
		}
		d.serve(tln, guarded)
	}
	attrs := []any{"version", version.Version, "pid", os.Getpid(), "data_dir", cfg.DataDir, "socket", d.socket}
	if d.tcp != nil {
		attrs = append(attrs, "tcp", d.tcp.String(), "tls", tlsConf != nil)
	}
	log.Info("forkd daemon serving", attrs...)
	return d, nil
}

func (d *daemon) serve(ln net.Listener, h http.Handler) {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       60 * time.Second,
		// No WriteTimeout: lifecycle calls are synchronous and a standby
		// of a large guest may take minutes.
		IdleTimeout:    120 * time.Second,
		MaxHeaderBytes: 64 << 10,
		ErrorLog:       slog.NewLogLogger(d.log.Handler(), slog.LevelWarn),
		// Requests must not inherit the run context: a stop signal lets
		// in-flight operations finish rather than cancelling them midway.
		BaseContext: func(net.Listener) context.Context { return context.Background() },
	}
	d.servers = append(d.servers, srv)
	d.listeners = append(d.listeners, ln)
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) && !d.stopping.Load() {
			d.errc <- fmt.Errorf("serve %s: %w", ln.Addr(), err)
		}
	}()
}

// wait serves until ctx is done or a listener fails, then shuts down.
func (d *daemon) wait(ctx context.Context) error {
	var serveErr error
	select {
	case <-ctx.Done():
		d.log.Info("forkd daemon stopping", "reason", context.Cause(ctx), "grace", d.grace())
	case serveErr = <-d.errc:
		d.log.Error("listener failed; stopping", "err", serveErr)
	}
	err := d.close(context.Background())
	if serveErr != nil {
		return serveErr
	}
	if err == nil {
		d.log.Info("forkd daemon stopped; VMs keep running")
	}
	return err
}

func (d *daemon) grace() time.Duration {
	if d.cfg.ShutdownGrace > 0 {
		return d.cfg.ShutdownGrace
	}
	return defaultShutdownGrace
}

// close shuts down. At once: the gate closes (a change that still arrives
// on an open connection gets 503 shutting_down, and every response tells
// the client to close its connection) and every listener stops accepting.
// The operations in flight get the grace period. If they all
// finish, the servers finish their last responses, the backend (the store)
// is closed and the data dir released. If some still run, close returns
// ErrGraceExpired without closing the store under them: the process is
// about to exit, and the journal covers them as it covers a crash. It never
// touches VMs.
func (d *daemon) close(ctx context.Context) error {
	d.stopping.Store(true)
	d.gate.Close()
	var errs []error
	for _, ln := range d.listeners {
		if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, fmt.Errorf("close listener %s: %w", ln.Addr(), err))
		}
	}
	gctx, cancel := context.WithTimeoutCause(ctx, d.grace(), ErrGraceExpired)
	defer cancel()
	if err := d.gate.Wait(gctx); err != nil {
		inflight := d.gate.InFlight()
		d.log.Error("shutdown: operations still running at the end of the grace period; exiting without closing the store under them (the next start reconciles them from the journal)",
			"grace", d.grace(), "in_flight", inflight)
		for _, srv := range d.servers {
			srv.Close()
		}
		// The store and the data dir lock stay open until the process exits
		// with the operations still using them.
		return fmt.Errorf("%w: %v", ErrGraceExpired, inflight)
	}
	for _, srv := range d.servers {
		// Only reads can still be running: let them answer, within the grace.
		// Shutdown closes the listeners it still tracks: those closed above
		// report net.ErrClosed unless Serve already saw them close.
		if err := srv.Shutdown(gctx); err != nil && !errors.Is(err, net.ErrClosed) {
			srv.Close()
			errs = append(errs, fmt.Errorf("shutdown http: %w", err))
		}
	}
	if d.backend != nil {
		if err := d.backend.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close backend: %w", err))
		}
	}
	if d.lock != nil {
		d.lock.Close() // releases the flock
	}
	return errors.Join(errs...)
}

// readToken reads the TCP bearer token: one line of at least 16
// characters, in a file group and others can neither read nor write (a token
// others can read is a token others have; one they can write is a token they
// choose). Anything else is refused, not warned about: the daemon would
// otherwise start exposed, or with a token no client can send (a second line
// made the token match no client).
func readToken(path string) (string, error) {
	if err := privateFile("token_file", path); err != nil {
		return "", err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("token file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if n := strings.Count(tok, "\n") + 1; n > 1 {
		return "", fmt.Errorf("token file %s holds %d lines; the token must be one line (e.g. `head -c 32 /dev/urandom | base64 -w0 > %s`)", path, n, path)
	}
	if len(tok) < 16 {
		return "", fmt.Errorf("token file %s: the token must be at least 16 characters (e.g. `head -c 32 /dev/urandom | base64 -w0 > %s`)", path, path)
	}
	return tok, nil
}

// privateFile refuses a secret file (the token, the TLS key) that is not a
// regular file or that group or others can read or write.
func privateFile(key, path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("%s: %w", key, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s %s is not a regular file", key, path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("%s %s has mode %v: group or others can read or write it; `chmod 600 %s` and start again", key, path, perm, path)
	}
	return nil
}

// loadTLS loads the TCP listener's certificate and key, if configured.
func loadTLS(cfg Config) (*tls.Config, error) {
	if cfg.TLSCert == "" {
		return nil, nil
	}
	if err := privateFile("tls_key", cfg.TLSKey); err != nil {
		return nil, err
	}
	cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
	if err != nil {
		return nil, fmt.Errorf("tls_cert/tls_key: %w", err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}
