package daemon

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/jail"
	"github.com/spf13/pflag"

	"github.com/forkd/forkd/internal/capacity"
)

func envOf(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestConfigPrecedenceFlagsOverEnvOverFileOverDefaults(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "forkd.yaml")
	yml := "data_dir: " + filepath.Join(dir, "from-file") + "\nlog_level: warn\nrestore_backend: uffd\npager_cache_bytes: 2GiB\nvmm_binary: /file/vmm\nfork_strategy: copy\nhost_path_dirs: /srv/images, /opt/kernels/\nmemory_overcommit: 2.5\nmax_memory_mib: 4096\n"
	if err := os.WriteFile(file, []byte(yml), 0o600); err != nil {
		t.Fatal(err)
	}
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	BindFlags(fs)
	if err := fs.Parse([]string{"--config", file, "--log-level", "debug", "--fork-strategy", "hardlink", "--prefetch", "off"}); err != nil {
		t.Fatal(err)
	}
	env := envOf(map[string]string{
		"FORKD_LOG_LEVEL":       "error",    // loses to the flag
		"FORKD_VMM_BINARY":      "/env/vmm", // beats the file
		"FORKD_FORK_STRATEGY":   "reflink",  // loses to the flag
		"FORKD_PREFETCH":        "auto",     // loses to the flag
		"FORKD_PREFETCH_WINDOW": "750ms",    // beats the default
	})
	c, err := LoadConfig(fs, env)
	if err != nil {
		t.Fatalf("LoadConfig: %v", err)
	}
	want := Config{
		DataDir: filepath.Join(dir, "from-file"), LogFormat: "text", LogLevel: "debug",
		VMMBinary: "/env/vmm", EmulatorFirecrackerVersion: "1.16", RestoreBackend: "uffd", ForkRestoreBackend: "file",
		PagerCacheBytes: 2 << 30, ForkStrategy: "hardlink", ImageHeadroom: 256 << 20, ShutdownGrace: time.Minute, MaxHeavyOps: 32, File: file,
		HostPathDirs: []string{"/srv/images", "/opt/kernels"},
		NetworkCIDR:  DefaultNetworkCIDR, NetworkGuestCIDR: "169.254.0.20/30", NetworkGuestMAC: "02:fc:00:00:00:05", NetworkWarm: 8, ForkTreePool: 32,
		Prefetch: "off", PrefetchWindow: 750 * time.Millisecond, PrefetchMaxBytes: 256 << 20,
		Capacity:  capacity.Limits{MaxVMMemoryRatio: 1, MaxMemoryMiB: 4096, MemoryOvercommit: 2.5, MaxRunningVMs: 1024},
		VMMJailer: "auto", JailUIDRange: jail.UIDRange{First: 900000, Last: 965535}, JailMemoryOverhead: 256 << 20,
	}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("config:\n got %+v\nwant %+v", c, want)
	}
}

func TestConfigDefaults(t *testing.T) {
	c, err := LoadConfig(nil, envOf(map[string]string{"FORKD_DATA": "/tmp/forkd-x"}))
	if err != nil {
		t.Fatal(err)
	}
	if c.DataDir != "/tmp/forkd-x" || c.VMMBinary != "auto" || c.RestoreBackend != "file" ||
		c.ForkRestoreBackend != "file" || c.PagerCacheBytes != 1<<30 || c.LogFormat != "text" || c.LogLevel != "info" ||
		c.ForkStrategy != "hardlink" || c.Prefetch != "auto" || c.PrefetchWindow != 5*time.Second || c.PrefetchMaxBytes != 256<<20 ||
		c.EmulatorFirecrackerVersion != "1.16" {
		t.Errorf("defaults: %+v", c)
	}
	c, err = LoadConfig(nil, envOf(nil))
	if err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 && c.DataDir != "/var/lib/forkd" {
		t.Errorf("root's default data dir is %q, want /var/lib/forkd", c.DataDir)
	}
}

func TestConfigRejectsBadValues(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name string
		env  map[string]string
		file string
		want string
	}{
		{"log format", map[string]string{"FORKD_LOG_FORMAT": "xml"}, "", "log_format"},
		{"log level", map[string]string{"FORKD_LOG_LEVEL": "loud"}, "", "log_level"},
		{"restore backend", map[string]string{"FORKD_RESTORE_BACKEND": "tape"}, "", "restore_backend"},
		{"fork restore backend", map[string]string{"FORKD_FORK_RESTORE_BACKEND": "x"}, "", "fork_restore_backend"},
		{"fork strategy", map[string]string{"FORKD_FORK_STRATEGY": "symlink"}, "", "fork_strategy"},
		{"cache size", map[string]string{"FORKD_PAGER_CACHE_BYTES": "lots"}, "", "pager_cache_bytes"},
		{"prefetch", map[string]string{"FORKD_PREFETCH": "always"}, "", "prefetch"},
		{"prefetch window", map[string]string{"FORKD_PREFETCH_WINDOW": "5"}, "", "prefetch_window"},
		{"negative prefetch window", map[string]string{"FORKD_PREFETCH_WINDOW": "-1s"}, "", "prefetch_window"},
		{"prefetch size", map[string]string{"FORKD_PREFETCH_MAX_BYTES": "big"}, "", "prefetch_max_bytes"},
		{"emulator version too old", map[string]string{"FORKD_EMULATOR_FIRECRACKER_VERSION": "1.9"}, "", "emulator_firecracker_version"},
		{"emulator version unreleased patch", map[string]string{"FORKD_EMULATOR_FIRECRACKER_VERSION": "1.12.7"}, "", "1.10, 1.11"},
		{"listen scheme", map[string]string{"FORKD_LISTEN": "http://127.0.0.1:1", "FORKD_TOKEN_FILE": "/t"}, "", "listen"},
		{"listen without token", map[string]string{"FORKD_LISTEN": "tcp://127.0.0.1:7000"}, "", "token_file"},
		{"unknown file key", nil, "data_dri: /x\n", "unknown key"},
		{"non-scalar file value", nil, "listen: [a, b]\n", "scalar"},
		{"bad yaml", nil, "listen: [\n", "not a YAML mapping"},
		{"non-loopback listen over plain HTTP", map[string]string{"FORKD_LISTEN": "tcp://0.0.0.0:7000", "FORKD_TOKEN_FILE": "/t"}, "", "tls_cert"},
		{"all interfaces over plain HTTP", map[string]string{"FORKD_LISTEN": "tcp://:7000", "FORKD_TOKEN_FILE": "/t"}, "", "listen_insecure"},
		{"a LAN address over plain HTTP", map[string]string{"FORKD_LISTEN": "tcp://192.168.1.5:7000", "FORKD_TOKEN_FILE": "/t"}, "", "listen_insecure"},
		{"tls cert without key", map[string]string{"FORKD_LISTEN": "tcp://0.0.0.0:7000", "FORKD_TOKEN_FILE": "/t", "FORKD_TLS_CERT": "/c"}, "", "both"},
		{"tls without listen", map[string]string{"FORKD_TLS_CERT": "/c", "FORKD_TLS_KEY": "/k"}, "", "listen is not set"},
		{"zero overcommit", map[string]string{"FORKD_MEMORY_OVERCOMMIT": "0"}, "", "memory_overcommit"},
		{"negative memory cap", map[string]string{"FORKD_MAX_MEMORY_MIB": "-1"}, "", "max_memory_mib"},
		{"no running VMs at all", map[string]string{"FORKD_MAX_RUNNING_VMS": "0"}, "", "max_running_vms"},
		{"relative host_path_dirs", map[string]string{"FORKD_HOST_PATH_DIRS": "/ok,images"}, "", "host_path_dirs"},
		{"listen_insecure not a bool", map[string]string{"FORKD_LISTEN_INSECURE": "maybe"}, "", "listen_insecure"},
		{"network_cidr not a CIDR", map[string]string{"FORKD_NETWORK_CIDR": "10.200.0.0"}, "", "network_cidr"},
		{"network_cidr too small", map[string]string{"FORKD_NETWORK_CIDR": "10.200.0.0/31"}, "", "network_cidr"},
		{"network_cidr overlaps the guests", nil, "network_cidr: 169.254.0.0/24\n", "overlaps network_guest_cidr"},
		{"network_guest_cidr overlaps the pool", map[string]string{"FORKD_NETWORK_CIDR": "198.18.0.0/24", "FORKD_NETWORK_GUEST_CIDR": "198.18.0.4/30"}, "", "overlaps"},
		{"network_guest_mac multicast", map[string]string{"FORKD_NETWORK_GUEST_MAC": "01:00:5e:00:00:01"}, "", "network_guest_mac"},
		{"network_default not a bool", map[string]string{"FORKD_NETWORK_DEFAULT": "sometimes"}, "", "network_default"},
		{"network_warm negative", map[string]string{"FORKD_NETWORK_WARM": "-1"}, "", "network_warm"},
		{"fork_tree_pool too large", map[string]string{"FORKD_FORK_TREE_POOL": "5000"}, "", "fork_tree_pool"},
		{"fork_tree_pool not a count", nil, "fork_tree_pool: many\n", "fork_tree_pool"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{"FORKD_DATA": dir}
			for k, v := range tc.env {
				env[k] = v
			}
			if tc.file != "" {
				f := filepath.Join(t.TempDir(), "c.yaml")
				os.WriteFile(f, []byte(tc.file), 0o600)
				env["FORKD_CONFIG"] = f
			}
			_, err := LoadConfig(nil, envOf(env))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("LoadConfig: err %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

// Finding: `forkd serve --config /etc/shadow` printed a line of the file in
// its error (the YAML parser quotes what it cannot read). Now a config error
// names the file and a line, never its contents; an unknown key is named
// only if it looks like a setting (a typo), never if it may be a secret.
func TestConfigErrorsNeverEchoTheFile(t *testing.T) {
	secret := "s3cr3t-Hash$6$rounds=5000$abcdefgh"
	for _, tc := range []struct {
		name, content, want string
	}{
		{"shadow-like", "root:" + secret + ":19700:0:99999:7:::\nnobody:*:19700:0:99999:7:::\n", "forkd setting"},
		{"binary", "\x7fELF\x02\x01\x01" + secret + "\x00\x00", "not a YAML mapping"},
		{"a secret as a key", secret + ": 1\n", "not a forkd setting"},
		{"a list", "- " + secret + "\n", "not a YAML mapping"},
		{"a mapping of a secret", "log_level: {" + secret + ": 1}\n", "must be a scalar"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "cfg")
			if err := os.WriteFile(file, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
			BindFlags(fs)
			if err := fs.Parse([]string{"--config", file}); err != nil {
				t.Fatal(err)
			}
			_, err := LoadConfig(fs, envOf(nil))
			if err == nil {
				t.Fatal("LoadConfig accepted the file")
			}
			if strings.Contains(err.Error(), "s3cr3t") || strings.Contains(err.Error(), "rounds") {
				t.Errorf("the error echoes the file's contents: %v", err)
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), file) {
				t.Errorf("error %q does not name the file and say %q", err, tc.want)
			}
		})
	}
	// The twin: a typo of a setting is named, so the check above is not
	// passing because errors say nothing.
	file := filepath.Join(t.TempDir(), "cfg")
	os.WriteFile(file, []byte("log_levle: debug\n"), 0o600)
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	BindFlags(fs)
	fs.Parse([]string{"--config", file})
	if _, err := LoadConfig(fs, envOf(nil)); err == nil || !strings.Contains(err.Error(), `"log_levle"`) {
		t.Errorf("a mistyped key is not named: %v", err)
	}
}

// A non-loopback listen address needs TLS, or listen_insecure said out
// loud; loopback may serve plain HTTP. The accepted cases are the twins of
// the refusals in TestConfigRejectsBadValues.
func TestNonLoopbackListenNeedsTLSOrListenInsecure(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  map[string]string
	}{
		{"loopback v4", map[string]string{"FORKD_LISTEN": "tcp://127.0.0.1:7000"}},
		{"loopback v6", map[string]string{"FORKD_LISTEN": "tcp://[::1]:7000"}},
		{"localhost", map[string]string{"FORKD_LISTEN": "tcp://localhost:7000"}},
		{"TLS", map[string]string{"FORKD_LISTEN": "tcp://0.0.0.0:7000", "FORKD_TLS_CERT": "/c", "FORKD_TLS_KEY": "/k"}},
		{"listen_insecure", map[string]string{"FORKD_LISTEN": "tcp://0.0.0.0:7000", "FORKD_LISTEN_INSECURE": "true"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{"FORKD_DATA": t.TempDir(), "FORKD_TOKEN_FILE": "/t"}
			for k, v := range tc.env {
				env[k] = v
			}
			if _, err := LoadConfig(nil, envOf(env)); err != nil {
				t.Errorf("LoadConfig: %v", err)
			}
		})
	}
	// The flag alone means true.
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	BindFlags(fs)
	if err := fs.Parse([]string{"--listen", "tcp://0.0.0.0:7000", "--token-file", "/t", "--listen-insecure"}); err != nil {
		t.Fatal(err)
	}
	c, err := LoadConfig(fs, envOf(map[string]string{"FORKD_DATA": t.TempDir()}))
	if err != nil || !c.ListenInsecure {
		t.Errorf("--listen-insecure alone: %+v, %v", c.ListenInsecure, err)
	}
}
