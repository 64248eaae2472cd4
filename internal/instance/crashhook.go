package instance

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/forkd/forkd/internal/store"
)

// CrashAtEnv names the crash-injection hook used by the reliability suite
// (internal/reliability). When the daemon's environment sets
// FORKD_TEST_CRASH_AT=<op kind>:<step> (e.g. "standby:creating",
// "fork:begun", "compress:compressed"), the daemon SIGKILLs itself the moment
// that journal step is durable: the crash a power cut or OOM kill would
// cause, at a chosen point. Unset (the default, and always in production) it
// does nothing. A kind or step of "*" matches any.
const CrashAtEnv = "FORKD_TEST_CRASH_AT"

// FreezeAtEnv is CrashAtEnv's twin for power-loss tests: at the named point
// the daemon SIGSTOPs itself instead, so the test can shut the filesystem
// down without flushing its log (what a power cut leaves on disk) while
// nothing else runs, and then SIGKILL it. A SIGKILL alone never loses the
// page cache, so only this tells whether a write was made durable.
const FreezeAtEnv = "FORKD_TEST_FREEZE_AT"

// crashPoint kills (CrashAtEnv) or stops (FreezeAtEnv) the process if the
// variable names kind:step. It reads the environment on each call (no
// package state); the cost is a getenv or two per journal step. kind:step
// must be declared in journalSteps (steps.go): an undeclared crash point
// panics, as it would have no crash case.
func crashPoint(kind, step string) {
	if err := declaredStep(kind, step); err != nil {
		panic(err)
	}
	if matchPoint(os.Getenv(CrashAtEnv), kind, step) {
		// SIGKILL, not exit: no deferred function, no flush, no cleanup.
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is delivered asynchronously; never continue
	}
	if matchPoint(os.Getenv(FreezeAtEnv), kind, step) {
		// Every thread stops; the test cuts the power and SIGKILLs us.
		syscall.Kill(os.Getpid(), syscall.SIGSTOP)
		select {} // if resumed by mistake, never continue past the point
	}
}

func matchPoint(want, kind, step string) bool {
	if want == "" {
		return false
	}
	k, s, _ := strings.Cut(want, ":")
	return (k == kind || k == "*") && (s == step || s == "*")
}

// UnsafeSkipForkFileSyncEnv, set to "1", makes a fork skip the fsync of the
// new inodes in its directory (its disk copy or reflink, any fallback clone)
// while keeping the fsyncs of the directory, the rename and its parent. It
// exists only so the power-loss suite can show that it catches a missing
// fsync that matters (on ext4 a fork's disk is a copy whose data would be
// lost); never set it elsewhere.
const UnsafeSkipForkFileSyncEnv = "FORKD_TEST_UNSAFE_SKIP_FORK_FILE_SYNC"

// UnsafeSyncForkTopDirOnlyEnv, set to "1", makes a fork fsync only the top
// of its directory tree (and its new inodes), not each subdirectory. It
// exists only so the power-loss suite can show that it catches what that
// loses on btrfs (the links made in the subdirectories: a fork's mem-file,
// kernel and vmstate); never set it elsewhere.
const UnsafeSyncForkTopDirOnlyEnv = "FORKD_TEST_UNSAFE_SYNC_FORK_TOP_DIR_ONLY"

// UnsafeSyncForkAsOnXFSEnv, set to "1", makes a fork apply XFS's rule on
// any filesystem: fsync its new inodes and no directory of its tree before
// the rename (atomicfile.SyncTree). It exists only so the power-loss suite
// can show that it catches what the rule loses where the log is not in
// order (btrfs: the fork's linked files); never set it elsewhere.
const UnsafeSyncForkAsOnXFSEnv = "FORKD_TEST_UNSAFE_SYNC_FORK_AS_ON_XFS"

// NoDirRecordsEnv, set to "1", makes the daemon treat its data dir as one
// that keeps no directory records (checkFilesystem), as on a filesystem
// without trusted extended attributes: each fork's first commit is synced
// again, and its directory carries no record. The power-loss suite runs
// that path too; never set it elsewhere (it costs every fork an fsync).
const NoDirRecordsEnv = "FORKD_TEST_NO_DIR_RECORDS"

// UnsafeStaleForkRecordEnv, set to "1", makes the reconciler take back a
// fork's directory record without checking that it still describes the
// directory (forkDirRecord.describes). It exists only so a test can show
// that check is what keeps a stale record out; never set it elsewhere.
const UnsafeStaleForkRecordEnv = "FORKD_TEST_UNSAFE_STALE_FORK_RECORD"

// UnsafeUnsyncedForkBeginEnv, set to "1", makes a fork's first commit
// unsynced even where its directory carries no record (NoDirRecordsEnv). It
// exists only so the power-loss suite can show that the fsync of that commit
// is what keeps an acknowledged fork there; never set it elsewhere.
const UnsafeUnsyncedForkBeginEnv = "FORKD_TEST_UNSAFE_UNSYNCED_FORK_BEGIN"

// UnsafeRemoveForkInPlaceEnv, set to "1", makes the removal of a failed
// fork's dir start under the dir's own name (removePartialFiles), as it did
// before a fork renamed its dir ahead of its one commit. It exists only so
// a test can show that renaming the dir aside first is what keeps a
// half-removed fork from being taken back; never set it elsewhere.
const UnsafeRemoveForkInPlaceEnv = "FORKD_TEST_UNSAFE_REMOVE_FORK_IN_PLACE"

// GroupMinEnv, set to N > 1, holds every store group commit until N units
// are queued (or 30 s passed), so crash and power-loss tests can put N
// concurrent forks in one group and crash it at "fork:committing" (the
// group's writes are made, its COMMIT is not) or "fork:committed". Never set
// it elsewhere: it adds latency.
const GroupMinEnv = "FORKD_TEST_GROUP_MIN"

// storeOptions wires the store's group committer to the test hooks: each
// unit's label is a crash point reached just before its group commits.
func storeOptions() store.Options {
	o := store.Options{BeforeCommit: func(labels []string) {
		for _, l := range labels {
			kind, step, _ := strings.Cut(l, ":")
			crashPoint(kind, step)
		}
	}}
	if n, err := strconv.Atoi(os.Getenv(GroupMinEnv)); err == nil && n > 1 {
		o.MinGroup, o.MinGroupWait = n, 30*time.Second
	}
	return o
}

// UnsafeNoForkRollForwardEnv, set to "1", stops the reconciler from
// completing a fork whose unsynced commits a power cut lost, from its
// journal entry (rollForwardFork, and rollForwardBatches for a fork batch)
// or from its directory's own record (restoreForkRecord): such a fork is
// rolled back or set aside instead, acknowledged or not. It exists only so
// the power-loss suite can show that the fork's commits are really not
// fsynced and that the roll-forward is what keeps it; never set it
// elsewhere.
const UnsafeNoForkRollForwardEnv = "FORKD_TEST_UNSAFE_NO_FORK_ROLL_FORWARD"

// UnsafeNoForkRecordRestoreEnv, set to "1", stops the reconciler from
// restoring a fork's record from its directory's own record
// (restoreForkRecord) alone; the roll-forward from a journal entry still
// runs. It exists only so the power-loss suite can show that a fork's first
// commit is really not fsynced either and that the directory's record is
// what keeps the fork then; never set it elsewhere.
const UnsafeNoForkRecordRestoreEnv = "FORKD_TEST_UNSAFE_NO_FORK_RECORD_RESTORE"
