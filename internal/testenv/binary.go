package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
)

var build struct {
	once sync.Once
	path string
	err  error
}

// EnvBinary names a prebuilt forkd binary the tests use instead of building
// one.
const EnvBinary = "FORKD_TEST_BINARY"

// TestHooksTag is the build tag of the test-only VMM requests (the
// emulator's PUT /test/...): the forkd the tests build has them, the
// shipped one never does.
const TestHooksTag = "forkd_testhooks"

// ForkdBinary returns a forkd binary built from this source tree, once per
// test process (or $FORKD_TEST_BINARY). It is built as the shipped one is,
// static (CGO_ENABLED=0, so a jail needs no dynamic loader), plus the
// TestHooksTag requests. A build that fails fails the test:
// it is never a skip, because a product that does not build is broken.
func ForkdBinary(tb testing.TB) string {
	tb.Helper()
	p, err := BuildForkd()
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

// BuildForkd is ForkdBinary for TestMain, where no testing.TB exists yet.
// The binary lives in a temp dir that RemoveBuild deletes.
func BuildForkd() (string, error) {
	build.once.Do(func() {
		if p := os.Getenv(EnvBinary); p != "" {
			build.path = p
			return
		}
		dir, err := os.MkdirTemp("", "forkd-testbin")
		if err != nil {
			build.err = fmt.Errorf("testenv: build forkd: %w", err)
			return
		}
		out := filepath.Join(dir, "forkd")
		cmd := exec.Command("go", "build", "-tags", TestHooksTag, "-o", out, "./cmd/forkd")
		cmd.Dir = moduleRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			build.err = fmt.Errorf("testenv: go build ./cmd/forkd failed: %v\n%s", err, b)
			return
		}
		build.path = out
	})
	return build.path, build.err
}

// RemoveBuild deletes the binary BuildForkd built (not a $FORKD_TEST_BINARY).
func RemoveBuild() {
	if build.path != "" && os.Getenv(EnvBinary) == "" {
		os.RemoveAll(filepath.Dir(build.path))
	}
}

// moduleRoot is the directory holding go.mod, found from this file.
func moduleRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}
