package emulator

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// Config is the emulator's command line, named as Firecracker's, plus the
// release it stands for.
type Config struct {
	APISock string // --api-sock
	ID      string // --id
	LogPath string // --log-path ("" = stderr)
	Level   string // --level: Off, Error, Warning, Info, Debug, Trace (any case)
	// NoSeccomp is --no-seccomp: run without the VMM's seccomp filter
	// (development only, as in Firecracker).
	NoSeccomp bool
	// FirecrackerVersion (--firecracker-version MAJOR.MINOR[.PATCH]) is the
	// release whose API, strictness and snapshot data version the emulator
	// reproduces; default DefaultFirecrackerVersion. GET /version reports it
	// and GET / reports vmm_version as <release>-forkd+<forkd version>.
	FirecrackerVersion string
	// CrashAt is a test hook, from the environment variable
	// FORKD_TEST_VMM_CRASH_AT: "vmstate" or "memory" SIGKILLs the process
	// halfway through writing that file of a snapshot, as a VMM dying there
	// would. Empty in production.
	CrashAt string
	// ConfinePaths (--confine-paths, forkd's own flag; the manager passes
	// its data dir): the snapshot, mem-file, memory-backend and vsock socket
	// paths the API names (relative ones against the working directory) must lie inside
	// it, reached through no symlink below it. "" is Firecracker's
	// behaviour: any path. A jailed VMM needs none: its root is its dir.
	ConfinePaths string
}

// CrashAtEnv names the environment variable of Config.CrashAt.
const CrashAtEnv = "FORKD_TEST_VMM_CRASH_AT"

// ParseArgs parses Firecracker's command line. Firecracker flags forkd does
// not need (--boot-timer, --show-level, ...) are accepted and ignored so a
// command line built for the real binary works; --seccomp-filter (a
// compiled filter of Firecracker's own format) is refused rather than
// ignored, since ignoring it would silently run under another filter.
func ParseArgs(args []string) (Config, error) {
	fs := flag.NewFlagSet("forkd vmm", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var c Config
	fs.StringVar(&c.APISock, "api-sock", "/run/firecracker.socket", "path of the API Unix socket")
	fs.StringVar(&c.ID, "id", "anonymous-instance", "microVM id")
	fs.StringVar(&c.LogPath, "log-path", "", "log file (appended to)")
	fs.StringVar(&c.Level, "level", "Info", "log level: Error, Warning, Info, Debug")
	fs.StringVar(&c.ConfinePaths, "confine-paths", "", "forkd's own: snapshot, mem-file and memory-backend paths must lie inside this directory")
	fs.BoolVar(&c.NoSeccomp, "no-seccomp", false, "run without the seccomp filter (development only)")
	fs.StringVar(&c.FirecrackerVersion, "firecracker-version", DefaultFirecrackerVersion(),
		"the Firecracker release to emulate: "+strings.Join(SupportedVersions(), ", "))
	for _, b := range []string{"boot-timer", "show-level", "show-log-origin", "no-api"} {
		fs.Bool(b, false, "accepted for Firecracker compatibility; ignored")
	}
	var seccompFilter string
	fs.StringVar(&seccompFilter, "seccomp-filter", "", "refused: forkd vmm has its own filter")
	for _, s := range []string{"metrics-path", "module", "start-time-us", "start-time-cpu-us",
		"parent-cpu-time-us", "http-api-max-payload-size", "mmds-size-limit"} {
		fs.String(s, "", "accepted for Firecracker compatibility; ignored")
	}
	if err := fs.Parse(args); err != nil {
		return c, fmt.Errorf("forkd vmm: %w", err)
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("forkd vmm: unexpected arguments %q", fs.Args())
	}
	if seccompFilter != "" {
		return c, fmt.Errorf("forkd vmm: --seccomp-filter %s: custom filters are not supported (forkd vmm installs its own; --no-seccomp turns it off for development)", seccompFilter)
	}
	if err := ParseFirecrackerVersion(c.FirecrackerVersion); err != nil {
		return c, fmt.Errorf("forkd vmm: --firecracker-version: %w", err)
	}
	return c, nil
}

func parseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "error":
		return slog.LevelError, nil
	case "warning", "warn":
		return slog.LevelWarn, nil
	case "info":
		return slog.LevelInfo, nil
	case "debug", "trace":
		return slog.LevelDebug, nil
	case "off":
		return slog.LevelError + 100, nil
	}
	return 0, fmt.Errorf("forkd vmm: --level %q: want Off, Error, Warning, Info, Debug or Trace", s)
}

// Main is `forkd vmm ARGS...`: it serves the API until SendCtrlAltDel,
// SIGTERM/SIGINT or ctx ends, and returns nil on those orderly exits.
func Main(ctx context.Context, args []string, stderr io.Writer) error {
	cfg, err := ParseArgs(args)
	if err != nil {
		return err
	}
	cfg.CrashAt = os.Getenv(CrashAtEnv)
	return Run(ctx, cfg, stderr)
}

// Run serves one microVM's API on cfg.APISock.
func Run(ctx context.Context, cfg Config, stderr io.Writer) error {
	level, err := parseLevel(cfg.Level)
	if err != nil {
		return err
	}
	if cfg.FirecrackerVersion == "" {
		cfg.FirecrackerVersion = DefaultFirecrackerVersion()
	}
	rel, snap, err := lookupRelease(cfg.FirecrackerVersion)
	if err != nil {
		return fmt.Errorf("forkd vmm: --firecracker-version: %w", err)
	}
	var out io.Writer = stderr
	if cfg.LogPath != "" {
		f, err := os.OpenFile(cfg.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("forkd vmm: open log %s: %w", cfg.LogPath, err)
		}
		defer f.Close()
		out = f
	}
	log := slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: level})).With("instance", cfg.ID)

	// Like Firecracker, refuse to start on a path that exists: a stale socket
	// must be removed by whoever owns the directory, not silently stolen.
	ln, err := net.Listen("unix", cfg.APISock)
	if err != nil {
		return fmt.Errorf("forkd vmm: failed to open the API socket: %w", err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(true)

	// From here on, every thread runs under the VMM's seccomp filter
	// (seccomp.go): no API request is served before it is in place.
	if cfg.NoSeccomp {
		log.Warn("seccomp filter disabled (--no-seccomp): development only")
	} else if err := installSeccomp(); err != nil {
		ln.Close()
		return fmt.Errorf("forkd vmm: %w", err)
	}

	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ctx, exit := context.WithCancel(ctx)
	defer exit()

	v := newVMM(cfg.ID, rel, snap, log, exit)
	v.crashAt = cfg.CrashAt
	v.setConfine(cfg.ConfinePaths)
	srv := &http.Server{Handler: v.handler(), ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	log.Info("API server listening", "api_sock", cfg.APISock, "pid", os.Getpid(), "vmm_version", v.version,
		"snapshot_version", snap.String())

	select {
	case <-ctx.Done():
	case err := <-served:
		return fmt.Errorf("forkd vmm: API server: %w", err)
	}
	// Let the response of SendCtrlAltDel (or any in-flight call) go out.
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		log.Warn("API server shutdown", "error", err)
	}
	v.stopGuest()
	log.Info("VMM exiting")
	return nil
}
