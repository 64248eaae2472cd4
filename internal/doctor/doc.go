// Package doctor is `forkd doctor`: the host preflight a new user runs
// first. Each check says what the host has, what it lacks, and what forkd
// does without it ("no KVM: VMs run on the built-in emulator"), so that a
// degraded host is a known trade-off rather than a surprise at the first
// restore. It reads the host and changes nothing, except a reflink probe
// that creates and removes two small files in the data dir (or the nearest
// directory above it that exists).
package doctor
