//go:build forkd_testhooks

package emulator

import (
	"net/http"
	"os"

	"golang.org/x/sys/unix"
)

// TestHooks is true in a build with the forkd_testhooks tag: test builds
// only (testenv builds forkd with it). The shipped binary has none of these
// requests.
const TestHooks = true

// registerTestHooks adds requests a test uses to act as a compromised VMM
// would, from inside the jail:
//
//	PUT /test/open {"path", "write"}   open a file (read-only, or for
//	                                   writing without creating it); 204,
//	                                   or 400 naming the error
//	PUT /test/violate-seccomp {}       make a syscall the filter denies
//	                                   (unshare(0)); under the filter the
//	                                   process dies with SIGSYS
func registerTestHooks(mux *http.ServeMux) {
	mux.HandleFunc("PUT /test/open", action(func(req struct {
		Path  string `json:"path"`
		Write bool   `json:"write"`
	}) error {
		flag := os.O_RDONLY
		if req.Write {
			flag = os.O_WRONLY
		}
		f, err := os.OpenFile(req.Path, flag, 0)
		if err != nil {
			return faultf("test open: %v", err)
		}
		return f.Close()
	}))
	mux.HandleFunc("PUT /test/violate-seccomp", action(func(struct{}) error {
		if _, _, errno := unix.Syscall(unix.SYS_UNSHARE, 0, 0, 0); errno != 0 {
			return faultf("unshare(0): %v", errno)
		}
		return nil
	}))
}

// testHookSchemas lets the test requests past strictBodies (every release
// has them in a test build; their bodies are the hooks' own business).
func testHookSchemas() map[string]*schema {
	return map[string]*schema{"PUT test": {open: true}}
}
