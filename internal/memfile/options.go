package memfile

// Options carries the caller's optional hooks. The zero value is valid; the
// package-level functions use it.
type Options struct {
	// Warn, when set, is told about degraded paths that still succeed, such as
	// a full copy because the filesystem cannot report holes. Its signature
	// matches (*slog.Logger).Warn, so a logger's method can be passed as is.
	Warn func(msg string, args ...any)

	// step, set only by this package's tests, is called after each named step
	// of a multi-step write so a crash test can kill the process exactly there.
	step func(name string)
}

// Steps of multi-step writes, named for crash tests.
const (
	stepTempCreated  = "temp-created"  // temp file exists, no data yet
	stepExtentCopied = "extent-copied" // one data extent copied (more may follow)
	stepTempWritten  = "temp-written"  // all data in the temp file, not yet fsynced
	stepTempSynced   = "temp-synced"   // temp file fsynced and closed
	stepRenamed      = "renamed"       // temp renamed over the name, directory fsynced
	stepMerged       = "extent-merged" // one diff extent written into the base
)

func (o Options) warn(msg string, args ...any) {
	if o.Warn != nil {
		o.Warn(msg, args...)
	}
}

func (o Options) at(step string) {
	if o.step != nil {
		o.step(step)
	}
}
