package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/testfs"
)

// Options is a complete fork-burst run as `forkd bench fork-burst` does it:
// a private daemon in a fresh data dir, optionally on a loopback filesystem.
type Options struct {
	Config
	// Binary is the forkd binary that runs the daemon; default this one.
	Binary string
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

// ForkBurst sets up a private daemon, runs the benchmark against it and
// tears everything down (unless Keep). The report is returned even when
// the run stopped early.
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
		fs, err := testfs.Mount(testfs.Kind(opt.FS), size)
		if err != nil {
			return nil, fmt.Errorf("fork-burst: loopback %s: %w", opt.FS, err)
		}
		defer func() { err = errors.Join(err, fs.Close()) }()
		parent = fs.Dir
		progress(fmt.Sprintf("loopback %s on %s at %s", opt.FS, fs.Device, fs.Dir))
	}
	work, err := os.MkdirTemp(parent, "forkd-bench-")
	if err != nil {
		return nil, fmt.Errorf("fork-burst: work dir: %w", err)
	}
	if opt.Keep {
		progress("keeping " + work)
	} else {
		defer os.RemoveAll(work)
	}

	d, err := StartDaemon(ctx, DaemonSpec{Binary: opt.Binary, DataDir: filepath.Join(work, "data"), Args: opt.DaemonArgs,
		LogPath: filepath.Join(work, "daemon.log")})
	if err != nil {
		return nil, fmt.Errorf("fork-burst: %w", err)
	}
	progress(fmt.Sprintf("daemon up: data dir %s, log %s", d.DataDir, d.LogPath))
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		if serr := d.Stop(sctx); serr != nil {
			err = errors.Join(err, fmt.Errorf("fork-burst: stop daemon: %w", serr))
		}
	}()

	target := Target{
		DataDir: d.DataDir,
		VMM:     vmmOf(opt.DaemonArgs),
		Connect: func(ctx context.Context, strategy string) (api.Service, func(context.Context) error, error) {
			if strategy != StrategyHardlink {
				// The manager always hardlinks (falling back only on link
				// errors); forcing reflink or copy needs a manager option.
				return nil, nil, fmt.Errorf("%w: %s (the daemon has no option to force it)", ErrStrategyUnsupported, strategy)
			}
			return d.Client, func(context.Context) error { return nil }, nil
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
