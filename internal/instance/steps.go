package instance

import (
	"fmt"
	"maps"
	"slices"

	"github.com/forkd/forkd/internal/image"
)

// journalSteps is the one list of forkd's crash points: for each kind of
// journalled operation, the steps it records (every kind starts with
// "begun", written by begin before anything is touched), plus the crash
// points of background work that is not journalled ("compress"). A step is
// a durable change after which a crash must be recoverable, so each one has
// a crash case in internal/reliability (TestCrashCasesCoverEveryJournalStep
// fails while one is missing), and op.step and crashPoint refuse a step
// that is not listed here. Whoever adds a step adds it here, in order, and
// adds its crash case. Steps that only some runs of a kind pass (a live
// fork's "paused", a Uffd restore's "session") are listed all the same. A
// store group commit's label is a crash point too, reached with the group's
// writes made and its COMMIT not yet ("fork:beginning", "fork:committing":
// see storeOptions).
var journalSteps = withImageSteps(map[string][]string{
	"create":          {"begun", "network", "files"}, // network: networked VMs only
	"start":           {"begun", "booted"},
	"stop":            {"begun"},
	"standby":         {"begun", "promoted", "creating", "created"},
	"restore":         {"begun", "session", "launched", "resumed"},
	"snapshot":        {"begun", "paused", "creating", "created", "stored"},
	"fork":            {"beginning", "begun", "network", "paused", "creating", "created", "files", "committing", "committed", "batch-renaming", "batch-files", "batch-committing", "batch-committed"}, // network: networked forks only; batch-*: a batch's (forkBatch)
	"delete":          {"begun"},
	"snapshot-delete": {"begun"},
	"compress":        {"compressed", "raw-removed"},                  // background, not journalled: crash points only
	"warm":            {"reserving", "reserved", "readying", "ready"}, // the warm network pool (netwarm.go): crash points only
	"migrate":         {"begun", "moved"},                             // a guest dir moved into the jail layout at start (migrate.go)
})

// withImageSteps adds the image store's kinds: it journals its own
// operations (its StepHook is crashPoint), and package image's tests check
// that it records exactly the steps it declares.
func withImageSteps(steps map[string][]string) map[string][]string {
	maps.Copy(steps, image.JournalSteps())
	return steps
}

// JournalSteps returns a copy of the crash points of every operation kind
// (see journalSteps), for the crash suite to check its cases against.
func JournalSteps() map[string][]string {
	out := make(map[string][]string, len(journalSteps))
	for k, v := range journalSteps {
		out[k] = slices.Clone(v)
	}
	return out
}

// declaredStep returns an error unless kind:step is in journalSteps: a step
// missing from the list would also be missing from the crash suite.
func declaredStep(kind, step string) error {
	if slices.Contains(journalSteps[kind], step) {
		return nil
	}
	return fmt.Errorf("journal step %s:%s is not declared in instance.journalSteps (kinds: %v); declare it and give it a crash case",
		kind, step, slices.Sorted(maps.Keys(journalSteps)))
}
