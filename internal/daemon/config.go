package daemon

import (
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/pflag"
	"gopkg.in/yaml.v3"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/capacity"
	"github.com/forkd/forkd/internal/emulator"
	"github.com/forkd/forkd/internal/instance"
	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/network"
)

// Config is the daemon's configuration. LoadConfig fills it from, in order
// of precedence: command-line flags, FORKD_* environment variables, the YAML
// file named by --config / FORKD_CONFIG, and the defaults.
type Config struct {
	DataDir   string // data_dir: all state; created 0700
	Listen    string // listen: optional tcp://HOST:PORT (needs TokenFile)
	TokenFile string // token_file: bearer token for the TCP listener
	// TLSCert and TLSKey (tls_cert, tls_key) serve the TCP listener over
	// TLS. A non-loopback listen address needs them, or ListenInsecure
	// (listen_insecure: true) to serve plain HTTP anyway.
	TLSCert        string
	TLSKey         string
	ListenInsecure bool
	// HostPathDirs (host_path_dirs, comma-separated absolute dirs) are where
	// a TCP client may name host files (kernel, rootfs); empty: nowhere.
	HostPathDirs []string
	LogFormat    string // log_format: text | json
	LogLevel     string // log_level: debug | info | warn | error

	VMMBinary string // vmm_binary: "auto" (firecracker if usable, else `forkd vmm`), "emulator", or a path
	// EmulatorFirecrackerVersion (emulator_firecracker_version) is the
	// Firecracker release `forkd vmm` stands for: its API, strictness and
	// snapshot data version. A real firecracker reports its own.
	EmulatorFirecrackerVersion string
	// VMMJailer (vmm_jailer) confines every VMM: "auto" (the jailer beside
	// firecracker, or `forkd jailer` for the emulator), a jailer's path, or
	// "none" (development only: VMMs run as root, unconfined).
	VMMJailer string
	// JailUIDRange (jail_uid_range) is where each running VMM's uid and gid
	// come from; JailMemoryOverhead (jail_memory_overhead) is added to a
	// VM's RAM for its cgroup's memory limit.
	JailUIDRange       jail.UIDRange
	JailMemoryOverhead int64
	RestoreBackend     string        // restore_backend: file | uffd
	ForkRestoreBackend string        // fork_restore_backend: file | uffd, for a fork's first restore
	PagerCacheBytes    int64         // pager_cache_bytes: the pager's page cache budget
	ForkStrategy       string        // fork_strategy: hardlink | reflink | copy (benchmarks only)
	Kernel             string        // kernel: the kernel of instances created without one
	ImageHeadroom      int64         // image_headroom: free space each image's filesystem gets
	Prefetch           string        // prefetch: auto | off
	PrefetchWindow     time.Duration // prefetch_window: a recording's time budget
	PrefetchMaxBytes   int64         // prefetch_max_bytes: a recording's size budget
	// ShutdownGrace (shutdown_grace) bounds how long a stopping daemon
	// waits for the operations in flight before it exits and leaves them to
	// the journal, as a crash would.
	ShutdownGrace time.Duration
	// MaxHeavyOps (max_heavy_ops) bounds the heavy operations in flight
	// (create, start, standby, restore, fork, snapshot): past it a request
	// gets 429 busy with Retry-After. 0 means no limit.
	MaxHeavyOps int

	NetworkCIDR      string // network_cidr: the pool of VMs' host-side addresses
	NetworkDefault   bool   // network_default: whether a create that does not say is networked
	NetworkEgress    bool   // network_egress: let guests open connections beyond the host
	NetworkGuestCIDR string // network_guest_cidr: every guest's address (first) and gateway (last)
	NetworkGuestMAC  string // network_guest_mac: every guest's MAC
	NetworkWarm      int    // network_warm: networks kept made ahead of any VM
	ForkTreePool     int    // fork_tree_pool: empty fork trees kept made ahead
	// NetworkRootNamespace (network_root_namespace): this daemon may network
	// VMs from the host's initial network namespace (a production daemon on
	// the host). Off, networking is off there: see network.ErrRootNamespace.
	NetworkRootNamespace bool

	// OrphansToLostFound is the one-shot --orphans-to-lost-found flag (no
	// env, no YAML key: it is a recovery step, not a setting): start over a
	// missing or empty store even though guests/ or snapshots/ hold forkd's
	// directories, moving them to <data>/lost+found/.
	OrphansToLostFound bool

	// Capacity limits (internal/capacity): max_vm_memory_ratio,
	// max_memory_mib, max_vcpus, memory_overcommit, max_running_vms.
	Capacity capacity.Limits

	File string // the YAML file the config was read from, "" if none
}

// setting is one configuration key and every way to set it.
type setting struct {
	key   string // YAML key
	env   string
	flag  string
	def   string // default, as text ("" for computed defaults)
	usage string
	set   func(c *Config, v string) error
}

// boolean reports whether s is a yes/no setting (its default is "true" or
// "false"): its flag alone (--flag) means true.
func (s setting) boolean() bool { return s.def == "true" || s.def == "false" }

// settings lists every configuration key. It is a function, not a variable,
// so nothing can change it at run time.
func settings() []setting {
	str := func(f func(c *Config) *string) func(*Config, string) error {
		return func(c *Config, v string) error { *f(c) = v; return nil }
	}
	boolean := func(f func(c *Config) *bool) func(*Config, string) error {
		return func(c *Config, v string) error {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return fmt.Errorf("%q is not true or false", v)
			}
			*f(c) = b
			return nil
		}
	}
	return []setting{
		{"data_dir", "FORKD_DATA", "data-dir", "",
			"data directory (default $FORKD_DATA, /var/lib/forkd as root, else ~/.local/share/forkd)",
			str(func(c *Config) *string { return &c.DataDir })},
		{"listen", "FORKD_LISTEN", "listen", "",
			"also listen on tcp://HOST:PORT (requires --token-file)",
			str(func(c *Config) *string { return &c.Listen })},
		{"token_file", "FORKD_TOKEN_FILE", "token-file", "",
			"file holding the bearer token the TCP listener requires",
			str(func(c *Config) *string { return &c.TokenFile })},
		{"tls_cert", "FORKD_TLS_CERT", "tls-cert", "",
			"PEM certificate (chain) for the TCP listener: with tls_key, it serves HTTPS",
			str(func(c *Config) *string { return &c.TLSCert })},
		{"tls_key", "FORKD_TLS_KEY", "tls-key", "",
			"PEM private key of tls_cert (a file only its owner can read)",
			str(func(c *Config) *string { return &c.TLSKey })},
		{"listen_insecure", "FORKD_LISTEN_INSECURE", "listen-insecure", "false",
			"serve a non-loopback listen address over plain HTTP (the token in clear text: only behind a tunnel or on a private network)",
			boolean(func(c *Config) *bool { return &c.ListenInsecure })},
		{"host_path_dirs", "FORKD_HOST_PATH_DIRS", "host-path-dirs", "",
			"comma-separated absolute directories under which a TCP client may name host files (kernel, rootfs); default none (over the Unix socket any plain file will do)",
			func(c *Config, v string) error {
				c.HostPathDirs = nil
				for _, d := range strings.Split(v, ",") {
					if d = strings.TrimSpace(d); d == "" {
						continue
					}
					if !filepath.IsAbs(d) {
						return fmt.Errorf("%q is not an absolute directory", d)
					}
					c.HostPathDirs = append(c.HostPathDirs, filepath.Clean(d))
				}
				return nil
			}},
		{"max_vm_memory_ratio", "FORKD_MAX_VM_MEMORY_RATIO", "max-vm-memory-ratio", "1.0",
			"one VM's guest RAM may be at most the host's MemTotal times this",
			floatSetting(func(c *Config) *float64 { return &c.Capacity.MaxVMMemoryRatio })},
		{"max_memory_mib", "FORKD_MAX_MEMORY_MIB", "max-memory-mib", "0",
			"one VM's guest RAM cap in MiB (0: only max_vm_memory_ratio)",
			intSetting(func(c *Config) *int { return &c.Capacity.MaxMemoryMiB })},
		{"max_vcpus", "FORKD_MAX_VCPUS", "max-vcpus", "0",
			"one VM's vCPU cap (0: only the API's 32)",
			intSetting(func(c *Config) *int { return &c.Capacity.MaxVcpus })},
		{"memory_overcommit", "FORKD_MEMORY_OVERCOMMIT", "memory-overcommit", "8",
			"the guest RAM of all running VMs together may be at most MemTotal times this (forks share clean pages; see the README)",
			floatSetting(func(c *Config) *float64 { return &c.Capacity.MemoryOvercommit })},
		{"max_running_vms", "FORKD_MAX_RUNNING_VMS", "max-running-vms", "1024",
			"how many VMs may run at once on this host (at least 1)",
			func(c *Config, v string) error {
				n, err := strconv.Atoi(v)
				if err != nil || n < 1 {
					return fmt.Errorf("%q is not a positive integer", v)
				}
				c.Capacity.MaxRunningVMs = n
				return nil
			}},
		{"log_format", "FORKD_LOG_FORMAT", "log-format", "text", "log format: text or json",
			str(func(c *Config) *string { return &c.LogFormat })},
		{"log_level", "FORKD_LOG_LEVEL", "log-level", "info", "log level: debug, info, warn or error",
			str(func(c *Config) *string { return &c.LogLevel })},
		{"vmm_binary", "FORKD_VMM_BINARY", "vmm-binary", "auto",
			`VMM: "auto" (firecracker when /dev/kvm and a firecracker binary exist, else the built-in emulator), "emulator", or a path`,
			str(func(c *Config) *string { return &c.VMMBinary })},
		{"emulator_firecracker_version", "FORKD_EMULATOR_FIRECRACKER_VERSION", "emulator-firecracker-version",
			emulator.DefaultFirecrackerVersion(),
			"the Firecracker release the built-in emulator stands for (API fields, strictness, snapshot data version): " +
				strings.Join(emulator.SupportedVersions(), ", "),
			str(func(c *Config) *string { return &c.EmulatorFirecrackerVersion })},
		{"vmm_jailer", "FORKD_VMM_JAILER", "vmm-jailer", "auto",
			`confine each VMM (own root, uid, cgroups, network namespace): "auto" (the jailer beside firecracker; forkd jailer for the emulator), a jailer's path, or "none" (development only: VMMs run as root, unconfined)`,
			str(func(c *Config) *string { return &c.VMMJailer })},
		{"jail_uid_range", "FORKD_JAIL_UID_RANGE", "jail-uid-range", DefaultJailUIDRange,
			"uids (and gids of the same numbers) for jailed VMMs, FIRST-LAST: one per running VMM, none shared",
			func(c *Config, v string) error {
				r, err := jail.ParseUIDRange(v)
				c.JailUIDRange = r
				return err
			}},
		{"jail_memory_overhead", "FORKD_JAIL_MEMORY_OVERHEAD", "jail-memory-overhead", DefaultJailMemoryOverhead,
			"memory a jailed VMM may use beyond its guest's RAM (its cgroup's limit is RAM + this; K/M/G/KiB/MiB/GiB suffixes allowed)",
			func(c *Config, v string) error {
				n, err := api.ParseBytes(v)
				if err == nil && n <= 0 {
					err = fmt.Errorf("%q: must be more than 0", v)
				}
				c.JailMemoryOverhead = n
				return err
			}},
		{"restore_backend", "FORKD_RESTORE_BACKEND", "restore-backend", api.BackendFile,
			"how restores load guest memory: file (mmap the mem-file) or uffd (through the pager)",
			str(func(c *Config) *string { return &c.RestoreBackend })},
		{"fork_restore_backend", "FORKD_FORK_RESTORE_BACKEND", "fork-restore-backend", api.BackendFile,
			"restore backend for a fork's first restore: file or uffd",
			str(func(c *Config) *string { return &c.ForkRestoreBackend })},
		{"pager_cache_bytes", "FORKD_PAGER_CACHE_BYTES", "pager-cache-bytes", "1GiB",
			"the pager's page cache budget (bytes; K/M/G/KiB/MiB/GiB suffixes allowed)",
			func(c *Config, v string) error {
				n, err := api.ParseBytes(v)
				c.PagerCacheBytes = n
				return err
			}},
		{"fork_strategy", "FORKD_FORK_STRATEGY", "fork-strategy", instance.ForkStrategyHardlink,
			"how a fork gets its mem-file: hardlink (zero-I/O fanout), or reflink / copy per fork, for benchmarks",
			str(func(c *Config) *string { return &c.ForkStrategy })},
		{"network_cidr", "FORKD_NETWORK_CIDR", "network-cidr", DefaultNetworkCIDR,
			"pool of VMs' host-side addresses (each networked VM takes one; the first usable is the host's end of every veth)",
			str(func(c *Config) *string { return &c.NetworkCIDR })},
		{"network_default", "FORKD_NETWORK_DEFAULT", "network-default", "false",
			"give a VM a network when its create request does not say (true or false)",
			boolean(func(c *Config) *bool { return &c.NetworkDefault })},
		{"network_egress", "FORKD_NETWORK_EGRESS", "network-egress", "false",
			"let guests open connections beyond the host, masqueraded behind its addresses (true or false)",
			boolean(func(c *Config) *bool { return &c.NetworkEgress })},
		{"network_root_namespace", "FORKD_NETWORK_ROOT_NAMESPACE", "network-root-namespace", "false",
			"network VMs even when the daemon runs in the host's own (initial) network namespace, as a production daemon does (true or false); " +
				"off, networking is off there, so a daemon started there by mistake never touches the host's links, routes and rules",
			boolean(func(c *Config) *bool { return &c.NetworkRootNamespace })},
		{"network_guest_cidr", "FORKD_NETWORK_GUEST_CIDR", "network-guest-cidr", network.DefaultGuestCIDR,
			"every guest's network: the guest takes the first usable address, its gateway (the TAP) the last",
			str(func(c *Config) *string { return &c.NetworkGuestCIDR })},
		{"network_guest_mac", "FORKD_NETWORK_GUEST_MAC", "network-guest-mac", network.DefaultGuestMAC,
			"every guest's MAC address",
			str(func(c *Config) *string { return &c.NetworkGuestMAC })},
		{"kernel", "FORKD_KERNEL", "kernel", "",
			"kernel image path for instances created without one (needed with firecracker; the emulator needs none)",
			str(func(c *Config) *string { return &c.Kernel })},
		{"image_headroom", "FORKD_IMAGE_HEADROOM", "image-headroom", "256MiB",
			"free space each image's root filesystem gets beyond its content (bytes; K/M/G suffixes allowed)",
			func(c *Config, v string) error {
				n, err := api.ParseBytes(v)
				c.ImageHeadroom = n
				return err
			}},
		{"prefetch", "FORKD_PREFETCH", "prefetch", instance.PrefetchAuto,
			"working-set prefetch: auto (a cache key's first restore records the pages it touches, every later restore prefetches them) or off",
			str(func(c *Config) *string { return &c.Prefetch })},
		{"prefetch_window", "FORKD_PREFETCH_WINDOW", "prefetch-window", "5s",
			"how long after a restore its working set is recorded (and prefetch waste measured), e.g. 5s, 500ms",
			func(c *Config, v string) error {
				d, err := time.ParseDuration(v)
				c.PrefetchWindow = d
				return err
			}},
		{"prefetch_max_bytes", "FORKD_PREFETCH_MAX_BYTES", "prefetch-max-bytes", "256MiB",
			"the largest working set recorded (bytes; K/M/G/KiB/MiB/GiB suffixes allowed)",
			func(c *Config, v string) error {
				n, err := api.ParseBytes(v)
				c.PrefetchMaxBytes = n
				return err
			}},
		{"network_warm", "FORKD_NETWORK_WARM", "network-warm", "8",
			"networks kept made ahead of any VM once one is networked, so a fork takes a ready one (0: each makes its own)",
			poolSize(func(c *Config) *int { return &c.NetworkWarm })},
		{"fork_tree_pool", "FORKD_FORK_TREE_POOL", "fork-tree-pool", "32",
			"empty fork directories kept made ahead (for forks with memory), so a fork, or a batch of up to this many, makes no directory on its path (0: each makes its own)",
			poolSize(func(c *Config) *int { return &c.ForkTreePool })},
		{"shutdown_grace", "FORKD_SHUTDOWN_GRACE", "shutdown-grace", "60s",
			"on SIGTERM, how long operations in flight may finish (a Go duration) before the daemon exits and leaves them to the journal",
			func(c *Config, v string) error {
				d, err := time.ParseDuration(v)
				if err == nil && d <= 0 {
					err = fmt.Errorf("%q: want a positive duration such as 60s", v)
				}
				c.ShutdownGrace = d
				return err
			}},
		{"max_heavy_ops", "FORKD_MAX_HEAVY_OPS", "max-heavy-ops", "32",
			"heavy operations (create, start, standby, restore, fork, snapshot) at once; more get 429 busy with Retry-After (0: no limit)",
			func(c *Config, v string) error {
				n, err := strconv.Atoi(v)
				if err == nil && n < 0 {
					err = fmt.Errorf("%q: want 0 (no limit) or more", v)
				}
				c.MaxHeavyOps = n
				return err
			}},
	}
}

// intSetting parses a non-negative integer into *f(c).
func intSetting(f func(c *Config) *int) func(*Config, string) error {
	return func(c *Config, v string) error {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return fmt.Errorf("%q is not a non-negative integer", v)
		}
		*f(c) = n
		return nil
	}
}

// poolSize parses the size of a pool made ahead (0 to 1024) into *f(c).
func poolSize(f func(c *Config) *int) func(*Config, string) error {
	return func(c *Config, v string) error {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > 1024 {
			return fmt.Errorf("%q is not a count from 0 to 1024", v)
		}
		*f(c) = n
		return nil
	}
}

// floatSetting parses a positive number into *f(c).
func floatSetting(f func(c *Config) *float64) func(*Config, string) error {
	return func(c *Config, v string) error {
		x, err := strconv.ParseFloat(v, 64)
		if err != nil || !(x > 0) || math.IsInf(x, 0) {
			return fmt.Errorf("%q is not a positive number", v)
		}
		*f(c) = x
		return nil
	}
}

// Defaults of the jail settings.
const (
	// DefaultJailUIDRange: 65,536 ids far above the ranges distributions
	// give users and services.
	DefaultJailUIDRange = "900000-965535"
	// DefaultJailMemoryOverhead covers a VMM's own memory beside its
	// guest's: Firecracker needs a few MiB, forkd's emulator its Go
	// runtime and network stack.
	DefaultJailMemoryOverhead = "256MiB"
)

// SettingDoc describes one configuration key, for documentation.
type SettingDoc struct{ Key, Env, Flag, Default, Usage string }

// Settings documents every configuration key.
func Settings() []SettingDoc {
	var out []SettingDoc
	for _, s := range settings() {
		out = append(out, SettingDoc{s.key, s.env, "--" + s.flag, s.def, s.usage})
	}
	return out
}

// BindFlags registers the daemon's flags (one per setting, plus --config).
func BindFlags(fs *pflag.FlagSet) {
	fs.String("config", "", "YAML config file (env FORKD_CONFIG); keys as in the README")
	fs.Bool(orphansFlag, false, "start even though the store is missing or empty while the data dir holds VMs: move them to <data>/lost+found/ (once, to recover; restoring forkd.db keeps them)")
	for _, s := range settings() {
		fs.String(s.flag, s.def, s.usage+" (env "+s.env+")")
		if s.boolean() {
			fs.Lookup(s.flag).NoOptDefVal = "true"
		}
	}
}

// orphansFlag is the one-shot recovery flag (Config.OrphansToLostFound).
const orphansFlag = "orphans-to-lost-found"

// LoadConfig resolves every setting: a flag the user set, else the
// environment, else the YAML file, else the default. fs must have been
// passed to BindFlags (nil means no flags).
func LoadConfig(fs *pflag.FlagSet, lookupEnv func(string) (string, bool)) (Config, error) {
	var c Config
	flag := func(name string) (string, bool) {
		if fs == nil || !fs.Changed(name) {
			return "", false
		}
		v, err := fs.GetString(name)
		return v, err == nil
	}

	file, ok := flag("config")
	if !ok {
		file, _ = lookupEnv("FORKD_CONFIG")
	}
	fromFile := map[string]string{}
	if file != "" {
		var err error
		if fromFile, err = readConfigFile(file); err != nil {
			return Config{}, err
		}
		c.File = file
	}

	for _, s := range settings() {
		v, ok := flag(s.flag)
		if !ok {
			v, ok = lookupEnv(s.env)
		}
		if !ok {
			v, ok = fromFile[s.key]
		}
		if !ok {
			v = s.def
		}
		if err := s.set(&c, strings.TrimSpace(v)); err != nil {
			return Config{}, fmt.Errorf("config %s: %w", s.key, err)
		}
	}
	if fs != nil && fs.Lookup(orphansFlag) != nil {
		c.OrphansToLostFound, _ = fs.GetBool(orphansFlag)
	}
	if c.DataDir == "" {
		// Env FORKD_DATA was consulted above; this is root's or the user's default.
		c.DataDir = api.DefaultDataDir(func(string) (string, bool) { return "", false })
	}
	abs, err := filepath.Abs(c.DataDir)
	if err != nil {
		return Config{}, fmt.Errorf("config data_dir %q: %w", c.DataDir, err)
	}
	c.DataDir = abs
	return c, c.Validate()
}

// readConfigFile reads a flat YAML mapping of setting keys. Unknown keys are
// an error: a misspelt key silently ignored is a setting silently lost.
func readConfigFile(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config file: %w", err)
	}
	// Errors name the file, a line and a key, never the file's contents:
	// `--config /etc/shadow` must not print a line of it (the YAML parser's
	// own errors quote the text they could not read).
	var raw map[string]any
	if err := yaml.Unmarshal(b, &raw); err != nil {
		return nil, fmt.Errorf("config file %s is not a YAML mapping of forkd settings%s (its contents are not shown); see the README for the keys", path, yamlLine(err))
	}
	known := map[string]bool{}
	for _, s := range settings() {
		known[s.key] = true
	}
	out := map[string]string{}
	for k, v := range raw {
		if !known[k] {
			if !keyShape().MatchString(k) {
				return nil, fmt.Errorf("config file %s: a key that is not a forkd setting (not shown: it does not look like one)", path)
			}
			return nil, fmt.Errorf("config file %s: unknown key %q", path, k)
		}
		switch v := v.(type) {
		case string:
			out[k] = v
		case int, int64, uint64, float64, bool:
			out[k] = fmt.Sprint(v)
		case nil:
		default:
			return nil, fmt.Errorf("config file %s: key %q must be a scalar", path, k)
		}
	}
	return out, nil
}

// keyShape is what a setting key looks like; an unknown key of this shape
// is named in the error (a typo), any other is not (it may be a secret).
var keyShape = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[a-z][a-z0-9_]{0,63}$`) })

var yamlLineRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`line (\d+)`) })

// yamlLine is " (line N)" for a YAML error that names a line, else "".
func yamlLine(err error) string {
	if m := yamlLineRE().FindStringSubmatch(err.Error()); m != nil {
		return " (line " + m[1] + ")"
	}
	return ""
}

// Validate checks values that LoadConfig cannot fix up.
func (c Config) Validate() error {
	if _, err := c.NetworkConfig(); err != nil {
		return fmt.Errorf("config %w", err)
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		return fmt.Errorf("config log_format: %q is not text or json", c.LogFormat)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("config log_level: %q is not debug, info, warn or error", c.LogLevel)
	}
	for key, v := range map[string]string{"restore_backend": c.RestoreBackend, "fork_restore_backend": c.ForkRestoreBackend} {
		if v != api.BackendFile && v != api.BackendUffd {
			return fmt.Errorf("config %s: %q is not file or uffd", key, v)
		}
	}
	if c.ForkStrategy != "" { // "" (a Config built in code): hardlink
		if err := instance.ValidForkStrategy(c.ForkStrategy); err != nil {
			return fmt.Errorf("config fork_strategy: %w", err)
		}
	}
	if err := instance.ValidPrefetch(c.Prefetch); err != nil && c.Prefetch != "" {
		return fmt.Errorf("config prefetch: %w", err)
	}
	if c.PrefetchWindow < 0 || c.PrefetchWindow > 10*time.Minute {
		return fmt.Errorf("config prefetch_window: %v: want a positive duration up to 10m", c.PrefetchWindow)
	}
	if c.PrefetchMaxBytes < 0 {
		return fmt.Errorf("config prefetch_max_bytes: %d is negative", c.PrefetchMaxBytes)
	}
	if c.VMMBinary == "" {
		return fmt.Errorf("config vmm_binary: empty; use \"auto\" or a path")
	}
	if c.EmulatorFirecrackerVersion != "" { // "" (a Config built in code): the emulator's default
		if err := emulator.ParseFirecrackerVersion(c.EmulatorFirecrackerVersion); err != nil {
			return fmt.Errorf("config emulator_firecracker_version: %w", err)
		}
	}
	if c.JailMemoryOverhead < 0 {
		return fmt.Errorf("config jail_memory_overhead: %d is negative", c.JailMemoryOverhead)
	}
	if c.PagerCacheBytes < 0 {
		return fmt.Errorf("config pager_cache_bytes: %d is negative", c.PagerCacheBytes)
	}
	if c.ImageHeadroom < 0 {
		return fmt.Errorf("config image_headroom: %d is negative", c.ImageHeadroom)
	}
	if c.DataDir == "" {
		return fmt.Errorf("config data_dir: empty")
	}
	if c.Listen != "" {
		if _, err := tcpAddr(c.Listen); err != nil {
			return err
		}
		if c.TokenFile == "" {
			return fmt.Errorf("config listen %s: a TCP listener requires token_file (--token-file)", c.Listen)
		}
		if (c.TLSCert == "") != (c.TLSKey == "") {
			return fmt.Errorf("config tls_cert and tls_key: give both or neither")
		}
		if c.TLSCert == "" && !c.ListenInsecure && !c.LoopbackListen() {
			return fmt.Errorf("config listen %s: a non-loopback address would carry the API and its bearer token in clear text; "+
				"give tls_cert and tls_key (--tls-cert, --tls-key) to serve HTTPS, or set listen_insecure: true (--listen-insecure) "+
				"if a tunnel or a private network protects it", c.Listen)
		}
	} else if c.TLSCert != "" || c.TLSKey != "" {
		return fmt.Errorf("config tls_cert/tls_key: they serve the TCP listener, but listen is not set")
	}
	return nil
}

// LoopbackListen reports whether the listen address is on loopback only
// (127.0.0.0/8, ::1 or localhost): the one place plain HTTP is allowed
// without listen_insecure.
func (c Config) LoopbackListen() bool {
	addr, err := tcpAddr(c.Listen)
	if err != nil {
		return false
	}
	host, _, _ := net.SplitHostPort(addr)
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// DefaultNetworkCIDR is network_cidr's default.
const DefaultNetworkCIDR = "10.200.0.0/16"

// NetworkConfig is the network configuration of this daemon's data dir
// (its tag comes from the data dir).
func (c Config) NetworkConfig() (network.Config, error) {
	cidr, guest, mac := c.NetworkCIDR, c.NetworkGuestCIDR, c.NetworkGuestMAC
	// A Config built in code may leave them empty: the defaults.
	if cidr == "" {
		cidr = DefaultNetworkCIDR
	}
	if guest == "" {
		guest = network.DefaultGuestCIDR
	}
	if mac == "" {
		mac = network.DefaultGuestMAC
	}
	nc, err := network.ParseConfig(cidr, guest, mac, c.NetworkEgress, network.Tag(c.DataDir))
	nc.RootNamespace = c.NetworkRootNamespace
	return nc, err
}

// tcpAddr returns HOST:PORT of a tcp://HOST:PORT listen address.
func tcpAddr(listen string) (string, error) {
	addr, ok := strings.CutPrefix(listen, "tcp://")
	if !ok {
		return "", fmt.Errorf("config listen %q: want tcp://HOST:PORT", listen)
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return "", fmt.Errorf("config listen %q: %w", listen, err)
	}
	return addr, nil
}
