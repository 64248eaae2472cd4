package reliability

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// vmmOpen asks instance id's VMM, through the test-only request a forkd
// built for tests answers, to open path as a compromised VMM would. It
// reports the HTTP status (204 opened, 400 refused) and the message.
func vmmOpen(t *testing.T, d *Daemon, id, path string, write bool) (int, string) {
	t.Helper()
	g, err := d.Layout.Guest(id)
	if err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", g.VMMSock())
	}}}
	body, _ := json.Marshal(map[string]any{"path": path, "write": write})
	req, _ := http.NewRequest("PUT", "http://vmm/test/open", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("PUT /test/open to %s's VMM: %v", id, err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode, b.String()
}

// A daemon on its defaults jails every VMM (vmm_jailer auto): CheckInvariants
// checks each one's uid, root, network namespace, memory limit and seccomp
// filter, and that every shared inode is sealed; from inside a jailed VMM,
// another VM's mem-file, the data dir's forkd.db and /etc/shadow cannot be
// opened, nor the shared mem-file it was restored from be opened for
// writing, while its own disk can.
func TestJailedDaemonConfinesEveryVMM(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil)
	ctx := ctxT(t, 60*time.Second)
	h, err := d.Client.Health(ctx)
	if err != nil || h.Jailer == "none" || len(h.Warnings) != 0 {
		t.Fatalf("health of a daemon on its defaults: %+v, %v; want a jailer and no warning", h, err)
	}
	other := createStandby(t, d.Client, "other")
	src := createStandby(t, d.Client, "src")
	if _, err := d.Client.ForkInstance(ctx, "src", api.ForkRequest{Name: "kid", TargetState: api.StateRunning}); err != nil {
		t.Fatal(err)
	}
	action(t, d.Client, "src", "restore")
	uffdRestore(t, d.Client, "other")
	createRunning(t, d.Client, "fresh")
	checkAll(t, d)

	og, _ := d.Layout.Guest(other.ID)
	for _, p := range []string{og.Base().Memory(), d.Layout.DB(), "/etc/shadow"} {
		if code, text := vmmOpen(t, d, src.ID, p, false); code != 400 {
			t.Errorf("a jailed VMM opened %s: %d %s", p, code, text)
		}
		addFigure("hostile_requests", 1)
	}
	if code, text := vmmOpen(t, d, src.ID, "snapshots/snapshot-base/memory", true); code != 400 {
		t.Errorf("a jailed VMM opened the mem-file its fork shares for writing: %d %s", code, text)
	}
	if code, text := vmmOpen(t, d, src.ID, "rootfs.ext4", true); code != 204 {
		t.Errorf("a jailed VMM cannot open its own disk for writing: %d %s", code, text)
	}
}

// vmm_jailer none stays a working mode (development): health says so with
// a warning, everything works, and the same opens from inside a VMM reach
// the host: the twin of the test above.
func TestUnjailedDaemonWorksAndSaysSo(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil, "--vmm-jailer", "none")
	h, err := d.Client.Health(ctxT(t, 10*time.Second))
	if err != nil || h.Jailer != "none" || len(h.Warnings) == 0 || !strings.Contains(h.Warnings[0], "none") {
		t.Fatalf("health with vmm_jailer none: %+v, %v; want jailer none and a warning", h, err)
	}
	vm := createRunning(t, d.Client, "vm")
	if code, text := vmmOpen(t, d, vm.ID, d.Layout.DB(), false); code != 204 {
		t.Errorf("an unjailed VMM could not open forkd.db (%d %s): the jailed test's refusals would show nothing", code, text)
	}
	if !strings.Contains(d.LogTail(), "vmm_jailer none") {
		t.Errorf("the daemon did not warn about vmm_jailer none at start")
	}
	if _, err := Exercise(ctxT(t, 90*time.Second), d.Client); err != nil {
		t.Error(err)
	}
	checkAll(t, d)
}
