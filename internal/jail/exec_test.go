package jail

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/forkd/forkd/internal/testenv"
)

func TestStageExecCopiesOnceAndRefusesDynamicBinaries(t *testing.T) {
	testenv.NeedRoot(t)
	dst := filepath.Join(t.TempDir(), "vmm", "forkd-vmm")
	if err := StageExec(testenv.ForkdBinary(t), dst); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dst, &st); err != nil || st.Uid != 0 || st.Mode&0o7777 != 0o555 {
		t.Fatalf("staged exec file: uid %d mode %o (%v); want root's, 0555", st.Uid, st.Mode&0o7777, err)
	}
	ino := st.Ino
	if err := StageExec(testenv.ForkdBinary(t), dst); err != nil {
		t.Fatal(err)
	}
	syscall.Stat(dst, &st)
	if st.Ino != ino {
		t.Error("staging the same bytes again rewrote the file (a jail holding a link to it would keep the old inode)")
	}

	dynamic := ""
	for _, p := range []string{"/bin/true", "/usr/bin/true", "/bin/sh"} {
		if err := CheckStatic(p); err != nil && strings.Contains(err.Error(), "dynamically linked") {
			dynamic = p
			break
		}
	}
	if dynamic == "" {
		t.Fatal("none of /bin/true, /usr/bin/true, /bin/sh is dynamically linked: nothing to refuse")
	}
	if err := StageExec(dynamic, filepath.Join(t.TempDir(), "x")); err == nil || !strings.Contains(err.Error(), "CGO_ENABLED=0") {
		t.Errorf("StageExec(%s) = %v, want a refusal saying how to build a static binary", dynamic, err)
	}
	if _, err := os.Stat(filepath.Join(t.TempDir(), "x")); err == nil {
		t.Error("a refused exec file was staged")
	}
}
