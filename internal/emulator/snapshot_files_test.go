package emulator

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Firecracker opens the vmstate with create|write|truncate and writes it in
// place: an existing vmstate keeps its inode, and a second link to it sees
// the new state too (what a manager that hardlinks vmstates must plan for).
func TestVMStateIsRewrittenInPlace(t *testing.T) {
	dir := t.TempDir()
	p := startVMM(t, dir)
	p.boot(bootSpec{vcpus: 1, memMib: 16, track: true, bootArgs: "forkd.ws_mib=2 forkd.rate=20000"})
	p.waitTicks(20)
	p.pause()
	vmstate, mem := filepath.Join(dir, "vmstate"), filepath.Join(dir, "mem")
	p.snapshot("Full", vmstate, mem)
	other := filepath.Join(dir, "vmstate.link")
	if err := os.Link(vmstate, other); err != nil {
		t.Fatal(err)
	}
	_, _, ino := fileInfo(t, vmstate)
	before, _ := os.ReadFile(other)
	p.resume()
	p.waitTicks(p.guest().Ticks + 20)
	p.pause()
	p.snapshot("Diff", vmstate, mem)
	_, _, ino2 := fileInfo(t, vmstate)
	after, _ := os.ReadFile(other)
	if ino2 != ino {
		t.Fatalf("the vmstate was replaced (inode %d -> %d), not rewritten in place", ino, ino2)
	}
	if bytes.Equal(before, after) {
		t.Fatalf("the other link to the vmstate still holds the old state: it was not rewritten in place")
	}
	if _, err := decodeVMState(after); err != nil {
		t.Fatalf("the rewritten vmstate does not decode: %v", err)
	}
}

// A Diff takes the dirty log (KVM_GET_DIRTY_LOG clears it) and a Full clears
// it: a second snapshot of a VM that has not run since writes no page.
func TestSnapshotsTakeTheDirtyLog(t *testing.T) {
	dir := t.TempDir()
	p := startVMM(t, dir)
	p.boot(bootSpec{vcpus: 1, memMib: 16, track: true, bootArgs: "forkd.ws_mib=2 forkd.rate=20000 forkd.write_pct=50"})
	p.waitTicks(50)
	p.pause()
	mem := filepath.Join(dir, "mem")
	for i, typ := range []string{"Full", "Diff", "Diff"} {
		fresh := filepath.Join(dir, typ+string(rune('0'+i)))
		if typ == "Full" {
			fresh = mem
		}
		p.snapshot(typ, filepath.Join(dir, "vmstate"), fresh)
		if i > 0 {
			if n := dataBytes(t, fresh); n != 0 {
				t.Fatalf("snapshot %d (%s) of a VM paused since the last one wrote %d bytes, want none", i, typ, n)
			}
		}
	}
	// The twin: with the guest running in between, a Diff has pages to write.
	p.resume()
	p.waitTicks(p.guest().Ticks + 50)
	p.pause()
	diff := filepath.Join(dir, "diff-after-run")
	p.snapshot("Diff", filepath.Join(dir, "vmstate"), diff)
	if dataBytes(t, diff) == 0 {
		t.Fatalf("a Diff after the guest ran wrote nothing")
	}
}

// The crash hook kills the VMM halfway through each file. The vmstate is
// written first: dying in it leaves a torn vmstate that a load refuses;
// dying in the memory leaves a whole vmstate beside a half-written
// mem-file (only the caller's journal can tell that snapshot is not whole).
func TestVMMDyingMidSnapshotLeavesWhatFirecrackerWould(t *testing.T) {
	for _, point := range []string{"vmstate", "memory"} {
		t.Run(point, func(t *testing.T) {
			dir := t.TempDir()
			p := startVMMWith(t, dir, func(c *exec.Cmd) error {
				c.Env = append(c.Env, CrashAtEnv+"="+point)
				return c.Start()
			})
			p.boot(bootSpec{vcpus: 1, memMib: 16, track: true, bootArgs: "forkd.ws_mib=2 forkd.rate=20000"})
			p.waitTicks(20)
			p.pause()
			vmstate, mem := filepath.Join(dir, "vmstate"), filepath.Join(dir, "mem")
			code, out, err := p.callErr("PUT", "/snapshot/create", map[string]any{"snapshot_type": "Full", "snapshot_path": vmstate, "mem_file_path": mem})
			if err == nil {
				t.Fatalf("snapshot/create answered %d %s; want the VMM dead before answering", code, out)
			}
			select {
			case <-p.exited:
			case <-time.After(30 * time.Second):
				t.Fatal("the VMM did not die")
			}
			data, err := os.ReadFile(vmstate)
			if err != nil {
				t.Fatal(err)
			}
			_, derr := decodeVMState(data)
			switch point {
			case "vmstate":
				if derr == nil {
					t.Fatalf("a vmstate torn at %d bytes decodes", len(data))
				}
				if _, err := os.Stat(mem); !os.IsNotExist(err) {
					t.Fatalf("the mem-file exists (%v): it was written before the vmstate", err)
				}
				q := startVMM(t, dir)
				q.fault("PUT", "/snapshot/load", map[string]any{"snapshot_path": vmstate,
					"mem_backend": map[string]any{"backend_type": "File", "backend_path": vmstate}}, "Load snapshot error")
			case "memory":
				if derr != nil {
					t.Fatalf("the vmstate, written before the memory, is not whole: %v", derr)
				}
				if n, full := dataBytes(t, mem), int64(16<<20); n == 0 || n >= full {
					t.Fatalf("mem-file holds %d data bytes of %d; want a half-written file", n, full)
				}
			}
		})
	}
}
