package daemonproc

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestStartOfADaemonThatExitsSaysSoWithItsLog: a binary that exits at once
// (here a script standing in for a broken forkd) is reported as exited, not
// as a timeout, and the error carries the end of its log.
func TestStartOfADaemonThatExitsSaysSoWithItsLog(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "fake-forkd")
	script := "#!/bin/sh\necho \"refusing: $*\" >&2\necho \"env: $FORKD_LEAK\" >&2\nexit 3\n"
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("FORKD_LEAK", "from-the-caller")
	_, err := Start(context.Background(), Spec{
		Binary:  bin,
		DataDir: filepath.Join(dir, "d"),
		LogPath: filepath.Join(dir, "d.log"),
	})
	if err == nil {
		t.Fatal("Start of a daemon that exits at once succeeded")
	}
	for _, want := range []string{"daemon exited", "refusing: serve --data-dir", "env: \n"} {
		if !strings.Contains(err.Error()+"\n", want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "from-the-caller") {
		t.Errorf("the caller's FORKD_* variable reached the daemon: %v", err)
	}
}
