package instance

import (
	"fmt"
	"os"

	"github.com/forkd/forkd/internal/dirrecord"
	"github.com/forkd/forkd/internal/memfile"
	"github.com/prometheus/client_golang/prometheus"
)

// fsAdvice is what the manager found out at start about the data dir's
// filesystem, and what it advises about it.
type fsAdvice struct {
	fs      string // "xfs", "ext4", ...
	reflink bool
	// records: a directory here keeps a dirrecord, so a fork's directory
	// carries its own record and its first commit needs no fsync (fork).
	records bool
	advice  []string
}

// checkFilesystem probes whether the data dir can reflink. Where it cannot
// (ext4, for one), sharing a mem-file by hardlink still costs no copy, but
// the first standby of every fork must unshare its memory with a full
// copy of its RAM before it can diff into it (and every disk clone is a
// copy): the daemon says so at start, in /health and as a metric.
func (m *Manager) checkFilesystem() {
	dir := m.layout.JailsDir() // where guest memory lives
	if _, err := os.Stat(dir); err != nil {
		dir = m.layout.Root()
	}
	fs := memfile.FilesystemName(dir)
	ok, err := memfile.CanReflink(dir)
	a := fsAdvice{fs: fs, reflink: ok}
	switch {
	case err != nil:
		m.log.Warn("could not tell whether the data dir can reflink", "data_dir", m.layout.Root(), "err", err)
	case !ok:
		a.advice = []string{fmt.Sprintf("the data dir %s is on %s, which cannot reflink: each fork's first standby copies its whole RAM "+
			"before it writes a diff, and every VM disk is a full copy; put the data dir on XFS made with `mkfs.xfs -m reflink=1`, or on btrfs",
			m.layout.Root(), fs)}
		m.log.Warn("data dir cannot reflink: a fork's first standby copies its whole RAM", "data_dir", m.layout.Root(), "fs", fs,
			"fix", "XFS with -m reflink=1, or btrfs")
	default:
		m.log.Info("data dir can reflink", "data_dir", m.layout.Root(), "fs", fs)
	}
	var recErr error
	if os.Getenv(NoDirRecordsEnv) != "1" { // the power-loss suite's other path only
		a.records, recErr = dirrecord.Supported(m.layout.Root())
	}
	if !a.records {
		// Forks still work: each waits for its first commit's fsync.
		m.log.Warn("the data dir keeps no directory records: every fork waits for a synced commit", "data_dir", m.layout.Root(), "err", recErr)
	}
	m.fs = a
}

// Advice is what the daemon advises about its host (for GET /health): one
// sentence per thing that costs users, with the fix.
func (m *Manager) Advice() []string { return m.fs.advice }

// reflinkGauge reports 1 when the data dir can reflink, 0 when it cannot.
func (m *Manager) reflinkGauge() prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name:        "forkd_data_dir_reflink",
		Help:        "1 when the data dir's filesystem can reflink (XFS with reflink, btrfs), 0 when every clone is a copy (a fork's first standby copies its RAM).",
		ConstLabels: prometheus.Labels{"fs": m.fs.fs},
	}, func() float64 {
		if m.fs.reflink {
			return 1
		}
		return 0
	})
}
