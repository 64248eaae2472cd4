package memfile

// Mode says how a file was made available under a new name.
type Mode string

const (
	// ModeHardlink: the new name is another link to the same inode (shared
	// page cache, zero I/O).
	ModeHardlink Mode = "hardlink"
	// ModeReflink: a new inode sharing the source's disk extents (FICLONE).
	ModeReflink Mode = "reflink"
	// ModeCopy: a new inode with the data copied (sparse where the
	// filesystem reports holes).
	ModeCopy Mode = "copy"
)

// ShareResult is what ShareForFork did.
type ShareResult struct {
	Mode Mode
	// Reason is the errno name that made linking fail and forced a fallback
	// ("EXDEV", "EMLINK", "EPERM", ...); "" for a hardlink.
	Reason string
}
