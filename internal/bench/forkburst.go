package bench

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/forkd/forkd/internal/loopfs"
)

// Options is a complete fork-burst run as `forkd bench fork-burst` does it:
// a private daemon in a fresh data dir, optionally on a loopback filesystem.
type Options struct {
	Config
	// Binary is the forkd binary that runs the daemon; default this one.
	Binary string
	// Binaries are the binaries of Config.Builds, by build name.
	Binaries map[string]string
	// Dir is where the run's directory is made; default os.TempDir(). The
	// run never uses an existing data dir: it makes its own under Dir.
	Dir string
	// FS, when set (ext4, xfs, btrfs), puts the run on a fresh loopback
	// filesystem of FSSize bytes (root; default 64 GiB, sparse).
	FS     string
	FSSize int64
	// DaemonArgs are extra `forkd serve` flags (e.g. --vmm-binary).
	DaemonArgs []string
	// Keep leaves the run's directory (data dir and logs) in place.
	Keep bool
}

// ForkBurst runs the benchmark against private daemons (one per size,
// strategy, prefetch setting and build; those of one size and strategy up
// together, each size and strategy in turn) and tears everything down
// (unless Keep). The report is returned even when the run stopped early.
func ForkBurst(ctx context.Context, opt Options, progress func(string)) (rep *Report, err error) {
	if progress == nil {
		progress = func(string) {}
	}
	if opt.Binary == "" {
		if opt.Binary, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("fork-burst: find forkd binary: %w", err)
		}
	}
	parent := opt.Dir
	if opt.FS != "" {
		size := opt.FSSize
		if size == 0 {
			size = 64 << 30
		}
		fs, err := loopfs.Mount(loopfs.Kind(opt.FS), size)
		if err != nil {
			return nil, fmt.Errorf("fork-burst: loopback %s: %w", opt.FS, err)
		}
		defer func() { err = errors.Join(err, fs.Close()) }()
		parent = fs.Dir
		progress(fmt.Sprintf("loopback %s on %s at %s", opt.FS, fs.Device, fs.Dir))
	}
	// Short names: VMM sockets live 4 levels below and must fit in 108 bytes.
	work, err := os.MkdirTemp(parent, "fb-")
	if err != nil {
		return nil, fmt.Errorf("fork-burst: work dir: %w", err)
	}
	switch {
	case opt.Keep && opt.FS != "":
		// The loopback filesystem goes with the run (Close above), the data
		// dir with it: keep its logs, copied out before that.
		defer func() {
			under := opt.Dir
			if under == "" {
				under = os.TempDir()
			}
			kept, cerr := keepLogs(work, filepath.Join(under, "fb-logs-"))
			if cerr != nil {
				err = errors.Join(err, fmt.Errorf("fork-burst: keep the logs: %w", cerr))
				return
			}
			progress(fmt.Sprintf("kept the logs in %s (the data dir was on the loopback %s filesystem, removed with it)", kept, opt.FS))
		}()
	case opt.Keep:
		progress("keeping " + work)
	default:
		defer os.RemoveAll(work)
	}
	// Unix socket paths (VMM API sockets, pager sessions) live up to ~70
	// bytes below a data dir and must fit in 108: reach a deep work dir
	// through a short symlink in the temp dir.
	short := work
	if len(work) > 24 {
		linkDir, err := os.MkdirTemp("", "fb-")
		if err != nil {
			return nil, fmt.Errorf("fork-burst: %w", err)
		}
		defer os.RemoveAll(linkDir)
		short = filepath.Join(linkDir, "w")
		if err := os.Symlink(work, short); err != nil {
			return nil, fmt.Errorf("fork-burst: %w", err)
		}
	}

	// One daemon per strategy, each in its own data dir on the same
	// filesystem: hardlink is forkd's behaviour; the others ask the daemon
	// to force a strategy with --fork-strategy.
	daemons := 0
	target := Target{
		Dir: work,
		VMM: vmmOf(opt.DaemonArgs),
		Connect: func(ctx context.Context, v Variant) (Conn, error) {
			args := append(append([]string{}, opt.DaemonArgs...), v.Args...)
			if v.Strategy != StrategyHardlink {
				args = append(args, "--fork-strategy", v.Strategy)
			}
			if v.Prefetch != "" {
				args = append(args, "--prefetch", PrefetchSetting(v.Prefetch))
			}
			binary := opt.Binary
			if b := BuildOf(v.Prefetch); b != "" {
				if binary = opt.Binaries[b]; binary == "" {
					return Conn{}, fmt.Errorf("fork-burst: build %q has no binary", b)
				}
			}
			daemons++
			dir := filepath.Join(short, fmt.Sprintf("%s-%d", v.Strategy, daemons))
			d, err := StartDaemon(ctx, DaemonSpec{Binary: binary, DataDir: dir, Args: args, LogPath: dir + ".log"})
			if err != nil && v.Strategy != StrategyHardlink && strings.Contains(err.Error(), "unknown flag: --fork-strategy") {
				return Conn{}, fmt.Errorf("%w: %s (this forkd serve has no --fork-strategy to force it)", ErrStrategyUnsupported, v.Strategy)
			}
			if err != nil {
				return Conn{}, fmt.Errorf("fork-burst: %w", err)
			}
			progress(fmt.Sprintf("%s daemon up: data dir %s, log %s", v, d.DataDir, d.LogPath))
			return Conn{Service: d.Client, DataDir: d.DataDir, Pid: d.Pid(), Close: func(ctx context.Context) error {
				ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
				defer cancel()
				return d.Stop(ctx)
			}}, nil
		},
	}
	return Run(ctx, opt.Config, target, progress)
}

// keepLogs copies every *.log file under dir (daemon, pager and VMM logs)
// into a new directory named by prefix plus a random suffix, at the same
// relative paths, and returns that directory.
func keepLogs(dir, prefix string) (string, error) {
	out, err := os.MkdirTemp(filepath.Dir(prefix), filepath.Base(prefix))
	if err != nil {
		return "", err
	}
	err = filepath.WalkDir(dir, func(path string, e fs.DirEntry, err error) error {
		if err != nil || !e.Type().IsRegular() || !strings.HasSuffix(path, ".log") {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		dst := filepath.Join(out, rel)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, b, 0o644)
	})
	return out, err
}

// vmmOf names the VMM the daemon was told to use.
func vmmOf(args []string) string {
	for i, a := range args {
		if a == "--vmm-binary" && i+1 < len(args) {
			return args[i+1]
		}
	}
	return "auto"
}
