package reliability

import (
	"errors"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// TestDataDirAndSocketArePrivate checks the file modes forkd promises: the
// data dir 0700 (it holds guest memory), the API socket 0600, and nothing
// under the data dir writable by group or others.
func TestDataDirAndSocketArePrivate(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil)
	createStandby(t, d.Client, "src")
	if _, err := d.Client.ForkInstance(ctxT(t, 30*time.Second), "src", api.ForkRequest{Name: "kid", TargetState: api.StateRunning}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Client.CreateSnapshot(ctxT(t, 30*time.Second), "kid", api.SnapshotRequest{Name: "snap"}); err != nil {
		t.Fatal(err)
	}
	mode := func(p string) os.FileMode {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		return st.Mode().Perm()
	}
	if m := mode(d.Layout.Root()); m != 0o700 {
		t.Errorf("data dir mode %v, want 0700", m)
	}
	if m := mode(d.Layout.Socket()); m != 0o600 {
		t.Errorf("socket mode %v, want 0600", m)
	}
	filepath.WalkDir(d.Layout.Root(), func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		info, err := de.Info()
		if err == nil && info.Mode().Type()&fs.ModeSymlink == 0 && info.Mode().Perm()&0o022 != 0 {
			t.Errorf("%s is writable by group or others (%v)", p, info.Mode().Perm())
		}
		return nil
	})
}

// TestTCPListenerRequiresTheBearerToken starts a daemon with a TCP
// listener: no token, a wrong one, a prefix of the right one, another
// scheme or the token in the query string get 401 with a JSON error and
// reach nothing; the right token gets through.
func TestTCPListenerRequiresTheBearerToken(t *testing.T) {
	t.Parallel()
	tokenDir := t.TempDir()
	token := "s3cr3t-token-for-the-reliability-suite"
	tokenFile := filepath.Join(tokenDir, "token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d := newDaemon(t, nil, "--listen", "tcp://127.0.0.1:0", "--token-file", tokenFile)
	addr := tcpAddrFromLog(t, d)
	base := "http://" + addr
	cases := []struct {
		name, path, auth string
		want             int
	}{
		{"no token", "/instances", "", 401},
		{"wrong token", "/instances", "Bearer wrong-token-wrong-token-wrong", 401},
		{"prefix of the token", "/instances", "Bearer " + token[:len(token)-1], 401},
		{"token plus a byte", "/instances", "Bearer " + token + "x", 401},
		{"basic scheme", "/instances", "Basic " + token, 401},
		{"empty bearer", "/instances", "Bearer ", 401},
		{"token in the query", "/instances?access_token=" + token, "", 401},
		{"health needs it too", "/health", "", 401},
		{"right token", "/instances", "Bearer " + token, 200},
		{"scheme is case-insensitive", "/health", "bearer " + token, 200},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req, _ := http.NewRequestWithContext(ctxT(t, 10*time.Second), "GET", base+c.path, nil)
			if c.auth != "" {
				req.Header.Set("Authorization", c.auth)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			addFigure("auth_requests", 1)
			if resp.StatusCode != c.want {
				t.Errorf("GET %s with %q: %d, want %d", c.path, c.auth, resp.StatusCode, c.want)
			}
		})
	}
	// The typed client with the token works end to end; without it, a
	// create is refused and creates nothing.
	c, err := api.NewClient("tcp://"+addr, api.WithToken(token))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	anon, _ := api.NewClient("tcp://" + addr)
	defer anon.Close()
	_, err = anon.CreateInstance(ctxT(t, 10*time.Second), api.CreateInstanceRequest{Name: "x", MemoryMiB: testMemMiB})
	var se *api.StatusError
	if !errors.As(err, &se) || se.Status != http.StatusUnauthorized || se.Code != api.CodeUnauthorized {
		t.Errorf("create without a token: %v, want 401 %s", err, api.CodeUnauthorized)
	}
	if list, err := c.ListInstances(ctxT(t, 10*time.Second)); err != nil || len(list) != 0 {
		t.Errorf("list with the token: %v %v; want no instances (the anonymous create must not have run)", list, err)
	}
}

var tcpLogRE = regexp.MustCompile(`tcp=(127\.0\.0\.1:[0-9]+)`)

func tcpAddrFromLog(t *testing.T, d *Daemon) string {
	t.Helper()
	b, _ := os.ReadFile(d.Spec.LogPath)
	m := tcpLogRE.FindSubmatch(b)
	if m == nil {
		t.Fatalf("the daemon log names no tcp address:%s", d.LogTail())
	}
	return string(m[1])
}

// TestVMMsStartWithAMinimalEnvironment gives the daemon secrets in its
// environment and checks none reaches a VMM (started at create, restore
// and as a running fork): a VMM gets PATH and what the driver adds, not the
// daemon's HOME, FORKD_* settings or anything else.
func TestVMMsStartWithAMinimalEnvironment(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, []string{"FORKD_CANARY_SECRET=hunter2", "AWS_SECRET_ACCESS_KEY=canary", "FORKD_LOG_LEVEL=info"})
	createStandby(t, d.Client, "src")
	if _, err := d.Client.ForkInstance(ctxT(t, 30*time.Second), "src", api.ForkRequest{Name: "kid", TargetState: api.StateRunning}); err != nil {
		t.Fatal(err)
	}
	action(t, d.Client, "src", "restore")
	createRunning(t, d.Client, "fresh")
	vmms := 0
	for _, p := range ProcessesUnder(d.Layout.Root()) {
		if p.Kind != "vmm" {
			continue
		}
		vmms++
		env, err := Environ(p.Pid)
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range env {
			k, _, _ := strings.Cut(kv, "=")
			switch {
			case k == "PATH":
			case strings.HasPrefix(k, "FORKD_"), k == "HOME", k == "AWS_SECRET_ACCESS_KEY", strings.Contains(kv, "hunter2"):
				t.Errorf("VMM pid %d inherited %s from the daemon", p.Pid, kv)
			default:
				t.Logf("VMM pid %d has %s (added by the driver?)", p.Pid, k)
			}
		}
	}
	if vmms != 3 {
		t.Errorf("found %d VMMs, want 3", vmms)
	}
}

// TestRequestPathsStayInsideTheDataDir sends names, refs and host paths
// that would escape the data dir if anything joined them unchecked, and
// checks no file appears outside it. Kernel and rootfs are host paths the
// caller chooses (read, never written); a path inside the data dir (another
// guest's memory, say) must be refused, or one tenant's VM could boot with
// another's RAM as its disk.
func TestRequestPathsStayInsideTheDataDir(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil)
	src := createStandby(t, d.Client, "src")
	g, _ := d.Layout.Guest(src.ID)
	ctx := ctxT(t, 30*time.Second)
	for _, p := range []string{g.Latest().Memory(), g.Latest().VMState(), d.Layout.DB(),
		filepath.Join(g.Jail, "..", src.ID, "root", "snapshots", "snapshot-latest", "memory")} {
		_, err := d.Client.CreateInstance(ctx, api.CreateInstanceRequest{Name: "thief", MemoryMiB: testMemMiB, Rootfs: p, Start: new(bool)})
		addFigure("hostile_requests", 1)
		if err == nil {
			d.Client.DeleteInstance(ctx, "thief")
			t.Errorf("create with rootfs %s (inside the data dir) was accepted: a VM could read another guest's files", p)
		} else if !errors.Is(err, api.ErrInvalid) {
			t.Errorf("create with rootfs %s: %v, want 422 invalid_request", p, err)
		}
	}
	checkAll(t, d)
}
