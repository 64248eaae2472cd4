package daemon

import (
	"os"
	"strings"
	"testing"
)

// The README's configuration table is the users' reference: every setting,
// its environment variable and its flag must be in it.
func TestReadmeDocumentsEverySetting(t *testing.T) {
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatalf("read README.md: %v", err)
	}
	readme := string(b)
	for _, s := range Settings() {
		for _, want := range []string{"`" + s.Key + "`", "`" + s.Env + "`", "`" + s.Flag + "`"} {
			if !strings.Contains(readme, want) {
				t.Errorf("README.md does not document %s (setting %s)", want, s.Key)
			}
		}
	}
}
