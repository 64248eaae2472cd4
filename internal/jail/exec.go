package jail

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/forkd/forkd/internal/atomicfile"
)

// CheckStatic refuses an exec file a jail cannot run: one that needs a
// dynamic loader (an ELF interpreter), which an empty jail does not have.
// Firecracker's releases are static; forkd is when built with
// CGO_ENABLED=0 (make build).
func CheckStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("exec file %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("exec file %s is dynamically linked: a jail has no dynamic loader; use a static build (forkd: CGO_ENABLED=0, as make build does)", path)
		}
	}
	return nil
}

// StageExec puts a copy of src at dst for jailers to take the exec file
// from: root-owned, mode 0555 (no VMM may change it; forkd jailer then
// hardlinks it into each jail, and it must lie on the jails' filesystem
// for that), written through a temp file and renamed, and left alone when
// dst already holds the same bytes. The name of dst is the exec name every
// jail root's path carries.
func StageExec(src, dst string) error {
	if err := CheckStatic(src); err != nil {
		return err
	}
	want, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("stage exec file: %w", err)
	}
	if st, err := os.Lstat(dst); err == nil && st.Mode().IsRegular() && st.Mode().Perm() == 0o555 {
		if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Uid == 0 {
			if have, err := os.ReadFile(dst); err == nil && bytes.Equal(have, want) {
				return nil
			}
		}
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("stage exec file: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return fmt.Errorf("stage exec file: %w", err)
	}
	if err := atomicfile.WriteFile(dst, want, 0o555); err != nil {
		return fmt.Errorf("stage exec file %s: %w", dst, err)
	}
	// Whatever the umask took away: every VM's uid must be able to run it.
	if err := os.Chmod(dst, 0o555); err != nil {
		return fmt.Errorf("stage exec file %s: %w", dst, err)
	}
	return nil
}
