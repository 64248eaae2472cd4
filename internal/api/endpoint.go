package api

import (
	"os"
	"path/filepath"
)

// SocketName is the daemon's Unix socket inside the data dir.
const SocketName = "forkd.sock"

// DefaultDataDir is where forkd keeps its state when nothing says otherwise:
// $FORKD_DATA, else /var/lib/forkd for root, else ~/.local/share/forkd.
// The daemon and the CLI must agree on it, so both ask here.
func DefaultDataDir(lookupEnv func(string) (string, bool)) string {
	if d, ok := lookupEnv("FORKD_DATA"); ok && d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/var/lib/forkd"
	}
	if home, err := os.UserHomeDir(); err == nil && home != "" {
		return filepath.Join(home, ".local", "share", "forkd")
	}
	return filepath.Join(os.TempDir(), "forkd-"+os.Getenv("USER"))
}

// ResolveHost picks the daemon a client talks to: the flag value, else
// $FORKD_HOST, else the socket in DefaultDataDir.
func ResolveHost(flag string, lookupEnv func(string) (string, bool)) string {
	if flag != "" {
		return flag
	}
	if h, ok := lookupEnv("FORKD_HOST"); ok && h != "" {
		return h
	}
	return filepath.Join(DefaultDataDir(lookupEnv), SocketName)
}
