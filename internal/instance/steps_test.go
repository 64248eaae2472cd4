package instance

import (
	"context"
	"os"
	"regexp"
	"slices"
	"testing"

	"github.com/forkd/forkd/internal/image"
)

// Every step the code records or crashes at is declared in journalSteps,
// and every declared step is recorded somewhere: the list the crash suite is
// checked against is the code's own. (At run time op.step refuses an
// undeclared step; this catches one on a path no test happens to run.)
func TestJournalStepsAreExactlyTheStepsTheCodeRecords(t *testing.T) {
	calls := regexp.MustCompile(`(?:\bo\.step\(ctx, |crashPoint\()(?:"([a-z-]+)", )?"([a-z-]+)"`)
	// A store group's label ("kind:step", right after ctx) is the crash
	// point its BeforeCommit hook reaches.
	groups := regexp.MustCompile(`\(ctx, "([a-z-]+):([a-z-]+)"`)
	used := map[string]bool{}
	files, err := os.ReadDir(".")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		name := f.Name()
		if !regexp.MustCompile(`^[a-z]+\.go$`).MatchString(name) {
			continue // tests
		}
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range append(calls.FindAllStringSubmatch(string(b), -1), groups.FindAllStringSubmatch(string(b), -1)...) {
			used[m[2]] = true
			if m[1] != "" { // crashPoint("kind", "step")
				if !slices.Contains(journalSteps[m[1]], m[2]) {
					t.Errorf("%s: crash point %s:%s is not declared in journalSteps", name, m[1], m[2])
				}
			}
		}
	}
	for kind, steps := range journalSteps {
		if _, ok := image.JournalSteps()[kind]; ok {
			continue // package image records these (TestStepHookSeesExactlyTheDeclaredSteps)
		}
		for _, s := range steps {
			if s != "begun" && !used[s] {
				t.Errorf("journalSteps declares %s:%s, but no o.step or crashPoint in this package records %q", kind, s, s)
			}
		}
	}
	for s := range used {
		found := false
		for _, steps := range journalSteps {
			found = found || slices.Contains(steps, s)
		}
		if !found {
			t.Errorf("step %q is recorded but declared for no kind in journalSteps", s)
		}
	}
}

// Twin of the check above, at run time: a step missing from the list is
// refused before it is journalled.
func TestUndeclaredJournalStepIsRefused(t *testing.T) {
	o := &op{kind: "create", subject: "x"}
	if err := o.step(context.Background(), "no-such-step", nil); err == nil {
		t.Fatal("op.step accepted a step journalSteps does not declare")
	}
	if err := declaredStep("fork", "files"); err != nil {
		t.Fatalf("fork:files is declared but refused: %v", err)
	}
}
