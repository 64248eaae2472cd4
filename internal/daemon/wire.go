package daemon

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/forkd/forkd/internal/instance"
)

// newBackend builds the instance manager the daemon serves: it resolves the
// VMM binary (vmm_binary: auto picks firecracker only when /dev/kvm and a
// firecracker binary both exist, else this binary's `forkd vmm`), opens the
// store under the data dir and reconciles what an earlier run left (journal,
// temp files, VMMs that kept running). The pager starts lazily on the first
// Uffd restore; a pager that cannot start fails only those restores.
func newBackend(ctx context.Context, cfg Config, log *slog.Logger, reg prometheus.Registerer) (Backend, error) {
	vmm, err := instance.ResolveVMM(cfg.VMMBinary)
	if err != nil {
		return nil, fmt.Errorf("instance manager: %w", err)
	}
	log.Info("vmm resolved", "binary", vmm.Binary, "emulator", vmm.Emulator)
	if cfg.ForkStrategy != "" && cfg.ForkStrategy != instance.ForkStrategyHardlink {
		log.Warn("fork_strategy is not hardlink: forks copy or reflink their mem-file (for benchmarks; fanout is no longer zero-I/O)", "fork_strategy", cfg.ForkStrategy)
	}
	m, err := instance.New(ctx, instance.Config{
		DataDir:            cfg.DataDir,
		VMM:                vmm,
		RestoreBackend:     cfg.RestoreBackend,
		ForkRestoreBackend: cfg.ForkRestoreBackend,
		PagerCacheBytes:    cfg.PagerCacheBytes,
		ForkStrategy:       cfg.ForkStrategy,
		OrphansToLostFound: cfg.OrphansToLostFound,
		HostPathDirs:       cfg.HostPathDirs,
		Logger:             log,
		Registerer:         reg,
	})
	if err != nil {
		return nil, err
	}
	return m, nil
}
