package firecracker

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/testenv"
)

// helperEnv selects a helper VMM role when the test binary is re-executed as
// a VMM by Launch (the launched environment is minimal, so the role travels
// in LaunchSpec.Env).
const helperEnv = "FORKD_FCTEST_HELPER"

func TestMain(m *testing.M) {
	if role := os.Getenv(helperEnv); role == "launcher" {
		os.Exit(runLauncher(os.Args[1:]))
	} else if role != "" {
		os.Exit(runHelperVMM(role, os.Args[1:]))
	}
	os.Exit(testenv.Main(m))
}

// helperVersion is the release the "serve" helper claims; "old" claims one
// forkd refuses.
const helperVersion = "1.12.1"

// runHelperVMM is a stand-in VMM process with the command line of
// `firecracker --api-sock S --id ID`:
//   - "serve": answers GET / and GET /version like Firecracker helperVersion;
//   - "old": the same, as Firecracker 1.9.1 (older than MinVersion);
//   - "noversion": answers GET / but not GET /version;
//   - "silent": prints its pid and never creates the socket;
//   - "exit": prints an error and exits at once with status 3.
func runHelperVMM(role string, args []string) int {
	fs := flag.NewFlagSet("helper", flag.ContinueOnError)
	sock := fs.String("api-sock", "", "")
	id := fs.String("id", "", "")
	if err := fs.Parse(args); err != nil {
		fmt.Fprintln(os.Stderr, "helper: bad args:", err)
		return 2
	}
	switch role {
	case "serve", "old", "noversion":
		ver := map[string]string{"serve": helperVersion, "old": "1.9.1", "noversion": ""}[role]
		ln, err := net.Listen("unix", *sock)
		if err != nil {
			fmt.Fprintln(os.Stderr, "helper: listen:", err)
			return 1
		}
		fmt.Printf("helper pid %d serving on %s\n", os.Getpid(), *sock)
		_ = http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && r.URL.Path == "/" {
				_ = json.NewEncoder(w).Encode(InstanceInfo{AppName: "Firecracker", ID: *id, State: StateNotStarted, VMMVersion: ver})
				return
			}
			if r.Method == http.MethodGet && r.URL.Path == "/version" && ver != "" {
				_ = json.NewEncoder(w).Encode(VersionInfo{FirecrackerVersion: ver})
				return
			}
			w.WriteHeader(http.StatusBadRequest)
			fmt.Fprintf(w, `{"fault_message":"Invalid request method and/or path: %s %s"}`, r.Method, r.URL.Path)
		}))
		return 1
	case "silent":
		fmt.Printf("helper pid %d not listening\n", os.Getpid())
		select {}
	case "exit":
		fmt.Fprintln(os.Stderr, "helper: fatal: boom, cannot start")
		return 3
	}
	fmt.Fprintln(os.Stderr, "helper: unknown role", role)
	return 2
}

// runLauncher plays a daemon: it launches a "serve" helper VMM on the socket
// args[0], prints its pid, and exits without killing it.
func runLauncher(args []string) int {
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	p, err := Launch(context.Background(), LaunchSpec{
		Binary: exe, APISock: args[0], LogPath: args[0] + ".log", Env: []string{helperEnv + "=serve"},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(p.Pid)
	return 0
}

// helperSpec is a LaunchSpec that re-executes this test binary in role.
func helperSpec(t *testing.T, role string) LaunchSpec {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := shortTempDir(t)
	return LaunchSpec{
		Binary:  exe,
		APISock: filepath.Join(dir, "api.sock"),
		ID:      "vm-" + role,
		LogPath: filepath.Join(dir, "logs", "vmm.log"),
		Env:     []string{helperEnv + "=" + role},
	}
}

// shortTempDir is a temp dir short enough for a Unix socket path (108 bytes);
// t.TempDir under a long test name may not be.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "fct")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// launchForTest launches spec and kills the VMM at cleanup.
func launchForTest(t *testing.T, ctx context.Context, spec LaunchSpec) *Process {
	t.Helper()
	p, err := Launch(ctx, spec)
	if err != nil {
		t.Fatalf("Launch: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Kill(ctx); err != nil {
			t.Errorf("cleanup Kill: %v", err)
		}
	})
	return p
}

// forkdBinary is cmd/forkd built once per test binary run (a build failure
// is an error the caller fails on, never a skip).
var forkdBinary = testenv.BuildForkd
