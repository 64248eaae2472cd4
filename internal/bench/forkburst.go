package bench

import (
	"context"
	"errors"
	"fmt"
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
	if opt.Keep {
		progress("keeping " + work)
	} else {
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

// vmmOf names the VMM the daemon was told to use.
func vmmOf(args []string) string {
	for i, a := range args {
		if a == "--vmm-binary" && i+1 < len(args) {
			return args[i+1]
		}
	}
	return "auto"
}
