package emulator

import (
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/elastic/go-seccomp-bpf/arch"
)

// Every VMM these tests start runs under the filter, and they run under the
// race detector too: the whole suite passing is what shows the allow-list
// holds for the Go runtime, the race runtime and every request. This test
// shows the filter is really there.
func TestVMMRunsUnderItsSeccompFilter(t *testing.T) {
	p := startVMM(t, t.TempDir())
	// The socket listens just before the filter goes on; the first answer
	// comes after it.
	if code, body := p.call("GET", "/", nil); code != 200 {
		t.Errorf("GET / under the filter: %d %s", code, body)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Seccomp:\t2", "NoNewPrivs:\t1"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("VMM status lacks %q:\n%s", want, b)
		}
	}
}

// A misspelt name would silently allow nothing: every name must be a
// syscall of x86-64 (the list's architecture).
func TestAllowListNamesRealSyscalls(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("the list is written for x86-64")
	}
	info, err := arch.GetInfo("")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range allowedSyscalls {
		if _, ok := info.SyscallNames[n]; !ok {
			t.Errorf("allowedSyscalls names %q, which x86-64 does not have", n)
		}
	}
	for _, banned := range []string{"execve", "execveat", "fork", "vfork", "ptrace", "mount", "umount2", "pivot_root",
		"chroot", "setns", "unshare", "setuid", "setgid", "setgroups", "bpf", "perf_event_open", "init_module",
		"kexec_load", "keyctl", "process_vm_writev", "mknod", "mknodat", "chown", "fchown", "link", "linkat", "symlink"} {
		for _, n := range allowedSyscalls {
			if n == banned {
				t.Errorf("allowedSyscalls lets the VMM call %s", banned)
			}
		}
	}
}

func TestParseArgsSeccompFlags(t *testing.T) {
	c, err := ParseArgs([]string{"--api-sock", "/s", "--no-seccomp"})
	if err != nil || !c.NoSeccomp {
		t.Errorf("--no-seccomp: %+v, %v", c, err)
	}
	if _, err := ParseArgs([]string{"--api-sock", "/s", "--seccomp-filter", "/f.bpf"}); err == nil || !strings.Contains(err.Error(), "--seccomp-filter") {
		t.Errorf("--seccomp-filter accepted (err %v): a custom filter must not be silently ignored", err)
	}
}

// The shipped build (this test binary has no forkd_testhooks tag) has no
// test requests: they answer as any unknown path does.
func TestShippedBuildHasNoTestRequests(t *testing.T) {
	if TestHooks {
		t.Skip("built with the forkd_testhooks tag")
	}
	rel, snap, _ := lookupRelease(DefaultFirecrackerVersion())
	v := newVMM("t", rel, snap, slog.New(slog.NewTextHandler(io.Discard, nil)), func() {})
	for _, path := range []string{"/test/open", "/test/violate-seccomp"} {
		rec := httptest.NewRecorder()
		v.handler().ServeHTTP(rec, httptest.NewRequest(http.MethodPut, path, strings.NewReader(`{"path":"/etc/shadow"}`)))
		if rec.Code != 400 || !strings.Contains(rec.Body.String(), "Invalid request method and/or path") {
			t.Errorf("PUT %s in the shipped build: %d %s, want 400 invalid path", path, rec.Code, rec.Body)
		}
	}
}
