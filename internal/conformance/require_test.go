package conformance

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/testenv"
)

// TestRealFirecrackerMissingFailsUnderKVMRequirement: where real
// Firecracker cannot run, the suite's firecracker target skips and says
// why, and with FORKD_TEST_REQUIRE=kvm it fails instead, so a KVM host's
// CI cannot go green without having run the real VMM. The child is this
// test binary pointed at a firecracker that does not exist, so both halves
// hold on any host.
func TestRealFirecrackerMissingFailsUnderKVMRequirement(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "firecracker")
	child := func(require string) (string, error) {
		cmd := exec.Command(os.Args[0], "-test.run", "^TestLifecycle$/^firecracker$", "-test.v", "-test.count=1")
		for _, kv := range os.Environ() {
			if !strings.HasPrefix(kv, testenv.EnvRequire+"=") && !strings.HasPrefix(kv, "FORKD_CONFORMANCE_") {
				cmd.Env = append(cmd.Env, kv)
			}
		}
		cmd.Env = append(cmd.Env, testenv.EnvRequire+"="+require, envVMM+"=firecracker", envFirecracker+"="+missing)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	why := envFirecracker + "=" + missing + " is not an executable file"

	out, err := child("")
	if err != nil || !strings.Contains(out, "SKIP (needs kvm)") || !strings.Contains(out, why) {
		t.Errorf("without the requirement: %v, want a pass that skips with %q; output:\n%s", err, why, out)
	}
	out, err = child(testenv.KVM)
	if err == nil || !strings.Contains(out, "required by "+testenv.EnvRequire) || !strings.Contains(out, why) {
		t.Errorf("under %s=kvm: %v, want a failure naming %q; output:\n%s", testenv.EnvRequire, err, why, out)
	}
}
