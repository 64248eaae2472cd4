package memfile

// Options carries the caller's optional hooks. The zero value is valid; the
// package-level functions use it.
type Options struct {
	// FullCopy, when set, is told that a copy of path had to move all of its
	// bytes because the filesystem cannot report holes (SEEK_DATA/SEEK_HOLE):
	// the sparse copy it asked for degraded to a full one. The manager logs
	// and counts it.
	FullCopy func(path string, bytes int64)

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
)

func (o Options) fullCopy(path string, bytes int64) {
	if o.FullCopy != nil {
		o.FullCopy(path, bytes)
	}
}

func (o Options) at(step string) {
	if o.step != nil {
		o.step(step)
	}
}
