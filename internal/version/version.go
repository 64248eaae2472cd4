// Package version holds forkd's version string. The daemon compares it with
// the pager's `--version` to pick (or start) the pager of its own version.
package version

// Version is overridden at build time with
// -ldflags "-X github.com/forkd/forkd/internal/version.Version=...".
var Version = "0.1.0-dev"
