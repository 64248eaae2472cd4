package daemon

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/instance"
	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/network"
)

// newBackend builds the instance manager the daemon serves: it resolves the
// VMM binary (vmm_binary: auto picks firecracker only when /dev/kvm and a
// firecracker binary both exist, else this binary's `forkd vmm`), opens the
// store under the data dir and reconciles what an earlier run left (journal,
// temp files, VMMs that kept running). The pager starts lazily on the first
// Uffd restore; a pager that cannot start fails only those restores.
func newBackend(ctx context.Context, cfg Config, log *slog.Logger, reg prometheus.Registerer) (_ Backend, err error) {
	vmm, err := instance.ResolveVMM(cfg.VMMBinary, cfg.EmulatorFirecrackerVersion)
	if err != nil {
		return nil, fmt.Errorf("instance manager: %w", err)
	}
	if vmm.Emulator {
		log.Info("vmm resolved", "binary", vmm.Binary, "emulator", true, "firecracker_version", cfg.EmulatorFirecrackerVersion)
	} else {
		log.Info("vmm resolved", "binary", vmm.Binary, "emulator", false)
	}
	// A Config built in code may leave the jail settings zero: their
	// defaults (vmm_jailer "" is auto).
	jailer, err := instance.ResolveJailer(cfg.VMMJailer, vmm)
	if err != nil {
		return nil, fmt.Errorf("instance manager: %w", err)
	}
	if cfg.JailUIDRange.First == 0 {
		cfg.JailUIDRange, _ = jail.ParseUIDRange(DefaultJailUIDRange)
	}
	if cfg.JailMemoryOverhead == 0 {
		cfg.JailMemoryOverhead, _ = api.ParseBytes(DefaultJailMemoryOverhead)
	}
	if len(jailer) > 0 {
		log.Info("vmm jailer", "jailer", jailer, "jail_uid_range", cfg.JailUIDRange.String(), "jail_memory_overhead", cfg.JailMemoryOverhead)
	}
	if cfg.ForkStrategy != "" && cfg.ForkStrategy != instance.ForkStrategyHardlink {
		log.Warn("fork_strategy is not hardlink: forks copy or reflink their mem-file (for benchmarks; fanout is no longer zero-I/O)", "fork_strategy", cfg.ForkStrategy)
	}
	netHost, offReason := newNetwork(cfg, log)
	if netHost != nil {
		defer func() {
			if err != nil {
				netHost.Close()
			}
		}()
	}
	m, err := instance.New(ctx, instance.Config{
		DataDir:            cfg.DataDir,
		VMM:                vmm,
		Jail:               instance.JailConfig{Jailer: jailer, UIDs: cfg.JailUIDRange, MemoryOverhead: cfg.JailMemoryOverhead},
		RestoreBackend:     cfg.RestoreBackend,
		ForkRestoreBackend: cfg.ForkRestoreBackend,
		PagerCacheBytes:    cfg.PagerCacheBytes,
		ForkStrategy:       cfg.ForkStrategy,
		Prefetch:           cfg.Prefetch,
		PrefetchWindow:     cfg.PrefetchWindow,
		PrefetchMaxBytes:   cfg.PrefetchMaxBytes,
		OrphansToLostFound: cfg.OrphansToLostFound,
		HostPathDirs:       cfg.HostPathDirs,
		Network:            netHost,
		NetworkOffReason:   offReason,
		NetworkDefault:     cfg.NetworkDefault,
		Kernel:             cfg.Kernel,
		ImageHeadroom:      cfg.ImageHeadroom,
		NetworkWarm:        cfg.NetworkWarm,
		ForkTreePool:       cfg.ForkTreePool,
		Capacity:           cfg.Capacity,
		Logger:             log,
		Registerer:         reg,
	})
	if err != nil {
		return nil, err
	}
	return m, nil
}

// newNetwork opens the network Host VMs are networked through, in the
// daemon's own network namespace. It changes nothing on the host: the host
// table and sysctls come with the first networked VM. A host that cannot
// network (no /dev/net/tun, not root) still serves VMs without one.
func newNetwork(cfg Config, log *slog.Logger) (*network.Host, string) {
	nc, err := cfg.NetworkConfig()
	if err != nil { // Validate already refused this
		return nil, err.Error()
	}
	if err := network.Check(); err != nil {
		log.Warn("networking off", "err", err)
		return nil, err.Error()
	}
	h, err := network.New(nc)
	if err != nil {
		log.Warn("networking off", "err", err)
		return nil, err.Error()
	}
	log.Info("networking", "network_cidr", nc.Pool, "addresses", nc.Slots(), "guest", nc.GuestAddr(), "tag", nc.Tag,
		"egress", nc.Egress, "default", cfg.NetworkDefault)
	return h, ""
}
