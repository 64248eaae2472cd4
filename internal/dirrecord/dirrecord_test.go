package dirrecord

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/forkd/forkd/internal/testenv"
)

type rec struct {
	ID, Name string
	MiB      int
}

func TestARecordReadsBackAsWritten(t *testing.T) {
	testenv.NeedRoot(t) // the trusted namespace needs CAP_SYS_ADMIN
	dir := t.TempDir()
	want := rec{ID: "abc", Name: "web", MiB: 256}
	if err := Write(dir, "fork", want); err != nil {
		t.Fatal(err)
	}
	var got rec
	ok, err := Read(dir, "fork", &got)
	if err != nil || !ok {
		t.Fatalf("Read: ok %v, err %v; want the record", ok, err)
	}
	if got != want {
		t.Fatalf("read %+v, wrote %+v", got, want)
	}
}

func TestADirWithoutARecordHasNone(t *testing.T) {
	var got rec
	ok, err := Read(t.TempDir(), "fork", &got)
	if ok || err != nil {
		t.Fatalf("Read of a bare dir: ok %v, err %v; want none, no error", ok, err)
	}
}

// TestARecordIsReadOnlyAsWhatItIs: a record of another kind or format
// version, or one that does not decode, is an error, never taken as a
// record of the kind asked for.
func TestARecordIsReadOnlyAsWhatItIs(t *testing.T) {
	testenv.NeedRoot(t)
	for _, tc := range []struct {
		name, value, want string
	}{
		{"another kind", `{"version":1,"kind":"snapshot","record":{}}`, `a "snapshot" record`},
		{"another version", `{"version":2,"kind":"fork","record":{}}`, "format version 2"},
		{"garbage", `not json`, "invalid character"},
		{"a record of the wrong shape", `{"version":1,"kind":"fork","record":[1]}`, "cannot unmarshal"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := unix.Setxattr(dir, Attr, []byte(tc.value), 0); err != nil {
				t.Fatal(err)
			}
			var got rec
			ok, err := Read(dir, "fork", &got)
			if ok || err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Read: ok %v, err %v; want an error saying %q", ok, err, tc.want)
			}
		})
	}
}

// TestASymlinkIsNeverFollowed: a record is read and written on the
// directory named, never on what a symlink there points to.
func TestASymlinkIsNeverFollowed(t *testing.T) {
	testenv.NeedRoot(t)
	target := t.TempDir()
	if err := Write(target, "fork", rec{ID: "planted"}); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	var got rec
	if ok, err := Read(link, "fork", &got); ok || err == nil {
		t.Fatalf("Read through a symlink: ok %v, err %v (%+v); want it refused", ok, err, got)
	}
	if err := Write(link, "fork", rec{ID: "over"}); err == nil {
		t.Fatal("Write through a symlink succeeded; want it refused")
	}
}

func TestSupportedProbesAndLeavesNothing(t *testing.T) {
	testenv.NeedRoot(t)
	dir := t.TempDir()
	ok, err := Supported(dir)
	if err != nil || !ok {
		t.Fatalf("Supported on %s (root): %v, %v; want true", dir, ok, err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 0 {
		t.Fatalf("the probe left %d entries in %s", len(ents), dir)
	}
}

// TestWriteWhereNoAttributeIsKeptSaysUnsupported: procfs keeps no extended
// attributes; a caller told ErrUnsupported falls back to what it did
// without records.
func TestWriteWhereNoAttributeIsKeptSaysUnsupported(t *testing.T) {
	testenv.NeedRoot(t)
	dir := fmt.Sprintf("/proc/%d", os.Getpid())
	err := Write(dir, "fork", rec{})
	if !errors.Is(err, ErrUnsupported) {
		t.Fatalf("Write on %s: %v; want ErrUnsupported", dir, err)
	}
}
