package reliability

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/testenv"
)

// The hostile-input probes (RELIABILITY.md, "Hostile input"):
// what a careless or hostile user (or a token holder) tries against the
// daemon, each with what forkd did before and does now.

// dirTree lists every entry under dir (never following symlinks) with its
// inode, size and mtime for regular files: an unchanged dirTree means
// nothing was removed, replaced or rewritten.
func dirTree(t *testing.T, dir string) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		line := rel
		if de.Type().IsRegular() && !strings.HasSuffix(p, ".log") {
			var st syscall.Stat_t
			if err := syscall.Lstat(p, &st); err != nil {
				return err
			}
			line += fmt.Sprintf(" ino=%d size=%d mtime=%d", st.Ino, st.Size, st.Mtim.Nano())
		}
		lines = append(lines, line)
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", dir, err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// Probe: `: > forkd.db`, then `forkd serve`. Before: the daemon took the
// store for a new one and its reconciler deleted every guest and snapshot
// directory, the directories of VMs still running among them, without a
// word. Now: it refuses to start, names what it found and the two ways on,
// and changes nothing; `--orphans-to-lost-found` then moves everything to
// <data>/lost+found/ intact, and never kills a VMM.
func TestEmptiedStoreRefusesToStartAndDestroysNothing(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, nil)
	running := createRunning(t, d.Client, "web")
	// The recovery start must leave this VMM running (below), so no daemon
	// will stop it: the test does, or it outlives the test in lost+found.
	t.Cleanup(func() { syscall.Kill(running.Pid, syscall.SIGKILL) })
	createStandby(t, d.Client, "parked")
	if _, err := d.Client.CreateSnapshot(ctxT(t, 30*time.Second), "parked", api.SnapshotRequest{Name: "snap"}); err != nil {
		t.Fatal(err)
	}
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(d.Layout.DB(), 0); err != nil {
		t.Fatal(err)
	}
	guests, snaps := dirTree(t, d.Layout.JailsDir()), dirTree(t, d.Layout.SnapshotsDir())

	ctx := context.Background()
	if nd, err := StartDaemon(ctx, d.Spec); err == nil {
		t.Cleanup(func() { nd.Shutdown(ctx) })
		t.Fatal("forkd serve started over an emptied store")
	} else {
		for _, want := range []string{"refusing to start", "forkd.db", "--orphans-to-lost-found", fmt.Sprint(running.Pid)} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("the refusal does not say %q:\n%v", want, err)
			}
		}
	}
	if got := dirTree(t, d.Layout.JailsDir()); got != guests {
		t.Errorf("jail/forkd-vmm/ changed by the refused start:\nbefore:\n%s\nafter:\n%s", guests, got)
	}
	if got := dirTree(t, d.Layout.SnapshotsDir()); got != snaps {
		t.Errorf("snapshots/ changed by the refused start:\nbefore:\n%s\nafter:\n%s", snaps, got)
	}
	if syscall.Kill(running.Pid, 0) != nil {
		t.Errorf("VMM of the running VM (pid %d) is gone", running.Pid)
	}

	spec := d.Spec
	spec.Args = append(append([]string{}, spec.Args...), "--orphans-to-lost-found")
	nd, err := StartDaemon(ctx, spec)
	if err != nil {
		t.Fatalf("forkd serve --orphans-to-lost-found: %v", err)
	}
	t.Cleanup(func() {
		if err := nd.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	if l, err := nd.Client.ListInstances(ctxT(t, 10*time.Second)); err != nil || len(l) != 0 {
		t.Errorf("instances after the recovery start: %v, %v; want none", l, err)
	}
	lf := filepath.Join(d.Layout.Root(), "lost+found")
	if got := dirTree(t, filepath.Join(lf, "jail")); got != guests {
		t.Errorf("lost+found/jail is not the old jail/forkd-vmm/:\nwant:\n%s\ngot:\n%s", guests, got)
	}
	if got := dirTree(t, filepath.Join(lf, "snapshots")); got != snaps {
		t.Errorf("lost+found/snapshots is not the old snapshots/:\nwant:\n%s\ngot:\n%s", snaps, got)
	}
	if syscall.Kill(running.Pid, 0) != nil {
		t.Errorf("VMM of the running VM (pid %d) was killed by the recovery start", running.Pid)
	}
	if !strings.Contains(nd.LogTail(), "lost+found") {
		t.Errorf("the recovery start did not log the move:%s", nd.LogTail())
	}
}

// Probe: `rootfs: /etc/shadow` over TCP, `kernel: /proc/self/mem`, a
// symlink to /etc/shadow. Before: 201, and a guest disk byte-identical to
// /etc/shadow. Now: 422 with nothing made; over TCP only files under
// host_path_dirs are accepted (the twin), over the socket any plain file.
func TestHostFilesAreConfined(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	token := "s3cr3t-token-for-the-reliability-suite"
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	images := filepath.Join(dir, "images")
	os.MkdirAll(images, 0o755)
	disk := filepath.Join(images, "disk.img")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(images, "shadow.img")
	os.Symlink("/etc/shadow", link)
	d := newDaemon(t, nil, "--listen", "tcp://127.0.0.1:0", "--token-file", tokenFile, "--host-path-dirs", images)
	tcp, err := api.NewClient("tcp://"+tcpAddrFromLog(t, d), api.WithToken(token))
	if err != nil {
		t.Fatal(err)
	}
	defer tcp.Close()
	no := false
	for _, tc := range []struct {
		name   string
		c      *api.Client
		kernel string
		rootfs string
	}{
		{"/etc/shadow over TCP", tcp, "", "/etc/shadow"},
		{"/proc/self/mem as a kernel over the socket", d.Client, "/proc/self/mem", ""},
		{"a symlink to /etc/shadow over the socket", d.Client, "", link},
		{"a relative path over the socket", d.Client, "", "images/disk.img"},
	} {
		_, err := tc.c.CreateInstance(ctxT(t, 30*time.Second), api.CreateInstanceRequest{Name: "thief", MemoryMiB: testMemMiB, Kernel: tc.kernel, Rootfs: tc.rootfs, Start: &no})
		var se *api.StatusError
		if !errors.As(err, &se) || se.Status != http.StatusUnprocessableEntity {
			t.Errorf("%s: %v; want 422", tc.name, err)
		}
	}
	if l, err := d.Client.ListInstances(ctxT(t, 10*time.Second)); err != nil || len(l) != 0 {
		t.Errorf("after the refusals: %v, %v; want no instance", l, err)
	}
	if _, err := tcp.CreateInstance(ctxT(t, 30*time.Second), api.CreateInstanceRequest{Name: "ok", MemoryMiB: testMemMiB, Rootfs: disk, Start: &no}); err != nil {
		t.Errorf("a file under host_path_dirs over TCP: %v", err)
	}
}

// Probe: a data dir owned by `nobody` with a planted `guests -> elsewhere`.
// Before: accepted without a word; guest dirs were created in the target,
// and the next start deleted the unrelated files found there. Now: the
// start is refused, naming the owner, and the target is untouched; with the
// dir given back to root the start is refused again for the symlink; with
// the symlink gone it starts (the twin).
func TestDataDirOthersControlIsRefused(t *testing.T) {
	t.Parallel()
	testenv.NeedRoot(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "d")
	elsewhere := filepath.Join(dir, "elsewhere")
	for _, d := range []string{data, elsewhere} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	precious := filepath.Join(elsewhere, "0123456789abcdef01234567")
	if err := os.WriteFile(precious, []byte("unrelated"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(elsewhere, filepath.Join(data, "guests")); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(data, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	spec := DaemonOptions{Binary: forkdBinary(t), DataDir: data, LogPath: filepath.Join(dir, "daemon.log")}
	ctx := context.Background()
	start := func() (*Daemon, error) {
		d, err := StartDaemon(ctx, spec)
		if err == nil {
			t.Cleanup(func() { d.Shutdown(ctx) })
		}
		return d, err
	}
	if _, err := start(); err == nil || !strings.Contains(err.Error(), "owned by uid 65534") {
		t.Fatalf("start over a data dir owned by nobody: %v; want a refusal naming the owner", err)
	}
	os.Chown(data, 0, 0)
	if _, err := start(); err == nil || !strings.Contains(err.Error(), "symlink") {
		t.Fatalf("start with guests a symlink: %v; want a refusal", err)
	}
	if b, err := os.ReadFile(precious); err != nil || string(b) != "unrelated" {
		t.Fatalf("the symlink's target was touched: %q, %v", b, err)
	}
	if ents, _ := os.ReadDir(elsewhere); len(ents) != 1 {
		t.Errorf("the symlink's target holds %d entries, want only its own", len(ents))
	}
	os.Remove(filepath.Join(data, "guests"))
	if _, err := start(); err != nil {
		t.Fatalf("start over a data dir only root controls: %v", err)
	}
}
