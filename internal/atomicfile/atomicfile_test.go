package atomicfile

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteFileReplacesContentAndLeavesNoTemp(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(p, []byte("new"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(p)
	if err != nil || string(got) != "new" {
		t.Fatalf("content = %q, %v; want \"new\"", got, err)
	}
	if _, err := os.Stat(p + TempSuffix); !os.IsNotExist(err) {
		t.Fatalf("temp file left behind: %v", err)
	}
}

func TestWriteFailureKeepsOldFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	err := Write(p, 0o600, func(w io.Writer) error {
		w.Write([]byte("partial"))
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v, want boom", err)
	}
	got, _ := os.ReadFile(p)
	if string(got) != "old" {
		t.Fatalf("content = %q after failed write, want \"old\"", got)
	}
	if _, err := os.Stat(p + TempSuffix); !os.IsNotExist(err) {
		t.Fatalf("temp file left behind: %v", err)
	}
}

func TestCommitDirMovesTheTreeIntoPlace(t *testing.T) {
	root := t.TempDir()
	tmp, final := filepath.Join(root, ".tmp-x"), filepath.Join(root, "x")
	if err := os.MkdirAll(filepath.Join(tmp, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(tmp, "sub", "f")
	if err := os.WriteFile(f, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := CommitDir(tmp, final, f); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(final, "sub", "f")); err != nil || string(got) != "data" {
		t.Fatalf("committed file = %q, %v; want \"data\"", got, err)
	}
	if _, err := os.Stat(tmp); !os.IsNotExist(err) {
		t.Fatalf("temp dir still there: %v", err)
	}
}

func TestCommitDirFailureLeavesNothingAtTheFinalName(t *testing.T) {
	root := t.TempDir()
	tmp, final := filepath.Join(root, ".tmp-x"), filepath.Join(root, "x")
	if err := os.Mkdir(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	// A file to fsync that is not there: the commit must stop before the rename.
	if err := CommitDir(tmp, final, filepath.Join(tmp, "missing")); err == nil {
		t.Fatal("CommitDir with a missing file succeeded")
	}
	if _, err := os.Stat(final); !os.IsNotExist(err) {
		t.Fatalf("final name exists after a failed commit: %v", err)
	}
}
