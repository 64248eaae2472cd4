package instance

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/store"
)

// Findings: `rootfs: /etc/shadow` (or a symlink to it) over TCP gave a VM
// disk byte-identical to /etc/shadow; `kernel: /proc/self/mem` was
// accepted; relative paths resolved against the daemon's working directory;
// a rootfs swapped for a FIFO hung the create in open. Now a TCP client may
// name only plain files under host_path_dirs, nobody may name /proc, /sys,
// /dev, a symlink, a FIFO or a relative path, and a refused create leaves
// nothing behind. The accepted creates are the twins.
func TestCreateConfinesHostPaths(t *testing.T) {
	allowed := t.TempDir()
	m := newTestManager(t, func(c *Config) { c.HostPathDirs = []string{allowed} })
	ctx := context.Background()
	remote := api.WithRemote(ctx)
	elsewhere := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(elsewhere, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	inAllowed := filepath.Join(allowed, "disk.img")
	if err := os.WriteFile(inAllowed, []byte(strings.Repeat("disk", 1<<18)), 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(allowed, "shadow.img")
	os.Symlink("/etc/shadow", link)
	fifo := filepath.Join(allowed, "fifo.img")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	f := false
	for _, tc := range []struct {
		name           string
		ctx            context.Context
		kernel, rootfs string
	}{
		{"/etc/shadow over TCP", remote, "", "/etc/shadow"},
		{"a file outside host_path_dirs over TCP", remote, "", elsewhere},
		{"/proc/self/mem as a kernel", ctx, "/proc/self/mem", ""},
		{"a symlink to /etc/shadow", ctx, "", link},
		{"a FIFO", ctx, "", fifo},
		{"a relative path", ctx, "", "disk.img"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			done := make(chan error, 1)
			go func() {
				_, err := m.CreateInstance(tc.ctx, api.CreateInstanceRequest{Name: "thief", Kernel: tc.kernel, Rootfs: tc.rootfs, Start: &f})
				done <- err
			}()
			var err error
			select {
			case err = <-done:
			case <-time.After(60 * time.Second):
				t.Fatal("create still blocked after 60 s")
			}
			if !errors.Is(err, api.ErrInvalid) {
				t.Fatalf("create: %v; want ErrInvalid", err)
			}
			if l, _ := m.ListInstances(ctx); len(l) != 0 {
				t.Errorf("a refused create left %d instances", len(l))
			}
			if ents, _ := os.ReadDir(m.layout.JailsDir()); len(ents) != 0 {
				t.Errorf("a refused create left %d entries under jail/", len(ents))
			}
		})
	}
	// Over TCP under host_path_dirs, and over the socket anywhere: accepted,
	// and the VM's disk and kernel are its own copies.
	in, err := m.CreateInstance(remote, api.CreateInstanceRequest{Name: "ok-tcp", MemoryMiB: testMemMiB, Rootfs: inAllowed, Kernel: inAllowed, Start: &f})
	if err != nil {
		t.Fatalf("create over TCP under host_path_dirs: %v", err)
	}
	g, _ := m.layout.Guest(in.ID)
	for _, p := range []string{g.Rootfs(), g.Kernel()} {
		if fingerprint(t, p).sum != fingerprint(t, inAllowed).sum || fingerprint(t, p).ino == fingerprint(t, inAllowed).ino {
			t.Errorf("%s is not a private copy of %s", p, inAllowed)
		}
	}
	in2, err := m.CreateInstance(ctx, api.CreateInstanceRequest{Name: "ok-socket", MemoryMiB: testMemMiB, Rootfs: elsewhere, BootArgs: testBootArgs})
	if err != nil {
		t.Fatalf("create over the socket with a file outside host_path_dirs: %v", err)
	}
	verifyGuest(t, m, in2.ID)
}

// Finding: a create left its instance visible (Created) while its files
// were still being made, and a create that then failed made it vanish
// again. Now the record is hidden (Creating) until the files are complete:
// neither listed nor resolved, and the reconciler removes one a crash left.
func TestInstanceIsNotVisibleUntilItsCreateFinished(t *testing.T) {
	dir := shortDir(t)
	usedStore(t, dir)
	ctx := context.Background()
	db, err := store.Open(ctx, filepath.Join(dir, "forkd.db"))
	if err != nil {
		t.Fatal(err)
	}
	half := store.Instance{ID: newID(), Name: "half", State: stateCreating, Vcpus: 1, MemoryMiB: testMemMiB, CreatedAt: time.Now()}
	if err := db.CreateInstance(ctx, half); err != nil {
		t.Fatal(err)
	}
	db.Close()
	layout, _ := guestdir.New(dir)
	halfG, _ := layout.Guest(half.ID)
	plant(t, halfG.Rootfs())
	m, err := newManagerErr(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if _, err := m.db.GetInstance(ctx, half.ID); err == nil {
		t.Error("the reconciler kept a record whose create never finished")
	}
	if exists(halfG.Jail) {
		t.Error("the reconciler kept the dir of a create that never finished")
	}
	// While a create runs, its record is hidden.
	half.ID = newID()
	if err := m.db.CreateInstance(ctx, half); err != nil {
		t.Fatal(err)
	}
	if l, _ := m.ListInstances(ctx); len(l) != 1 {
		t.Errorf("list shows %d instances, want only the finished one", len(l))
	}
	for _, ref := range []string{"half", half.ID} {
		if _, err := m.GetInstance(ctx, ref); !errors.Is(err, api.ErrNotFound) {
			t.Errorf("GET %s of a create in progress: %v; want not found", ref, err)
		}
	}
	// The twin: once Created, it shows.
	half.State = api.StateCreated
	m.db.UpdateInstance(ctx, half)
	if _, err := m.GetInstance(ctx, "half"); err != nil {
		t.Errorf("GET of a finished create: %v", err)
	}
	m.db.DeleteInstance(ctx, half.ID)
}
