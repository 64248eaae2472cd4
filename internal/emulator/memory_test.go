package emulator

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

func fileInfo(t *testing.T, path string) (size, allocated int64, ino uint64) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	sys := st.Sys().(*syscall.Stat_t)
	return st.Size(), sys.Blocks * 512, sys.Ino
}

// dataBytes sums the data extents of path (SEEK_DATA/SEEK_HOLE), i.e. what
// was written into a sparse file.
func dataBytes(t *testing.T, path string) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	var total, off int64
	for {
		start, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return total
		}
		if err != nil {
			t.Fatal(err)
		}
		end, err := unix.Seek(fd, start, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		total += end - start
		off = end
	}
}

func TestFullSnapshotRestoresInNewProcessWithoutIntegrityErrors(t *testing.T) {
	dir := t.TempDir()
	boot := bootSpec{vcpus: 2, memMib: 32, bootArgs: testBootArgs}
	src, vmstate, mem := bootedSnapshot(t, dir, boot, 3000)
	before := src.guest()
	requireClean(t, "source", before)

	// Full: RAM-sized and fully allocated (zero pages written as data).
	size, allocated, _ := fileInfo(t, mem)
	if size != 32<<20 || allocated < size {
		t.Fatalf("Full mem file: size %d allocated %d, want size %d fully allocated", size, allocated, 32<<20)
	}

	p := startVMM(t, dir)
	p.loadFile(vmstate, mem, false, true)
	if got := p.state(); got != "Running" {
		t.Fatalf("state after load with resume_vm: %q, want Running", got)
	}
	st := p.waitTicks(3000)
	requireClean(t, "restored", st)
	if st.Steps <= before.Steps || st.Generation != 1 || st.Lineage == before.Lineage {
		t.Fatalf("restored guest: steps %d (source stopped at %d), generation %d (want 1), lineage %#x (source %#x): want it to continue the source's history as a new lineage",
			st.Steps, before.Steps, st.Generation, st.Lineage, before.Lineage)
	}
	if st.Discards == 0 {
		t.Fatalf("restored guest discarded no free page (forkd.discard_pct=5): the File discard path did not run")
	}
	// A second snapshot of the restored VM, restored again, still checks out.
	p.pause()
	vmstate2, mem2 := filepath.Join(dir, "second.vmstate"), filepath.Join(dir, "second.mem")
	p.snapshot("Full", vmstate2, mem2)
	q := startVMM(t, dir)
	q.loadFile(vmstate2, mem2, false, true)
	requireClean(t, "restored twice", q.waitTicks(2000))
	if g := q.guest().Generation; g != 2 {
		t.Fatalf("generation after two restores: %d, want 2", g)
	}
}

// The twin of the test above: memory and vmstate from different moments
// must be caught by the workload at its first step.
func TestMismatchedMemoryAndVMStateIsAnIntegrityError(t *testing.T) {
	dir := t.TempDir()
	src, vmstateOld, _ := bootedSnapshot(t, dir, bootSpec{vcpus: 2, memMib: 32, bootArgs: testBootArgs}, 1000)
	src.resume()
	src.waitTicks(src.guest().Ticks + 1000)
	src.pause()
	vmstateNew, memNew := filepath.Join(dir, "new.vmstate"), filepath.Join(dir, "new.mem")
	src.snapshot("Full", vmstateNew, memNew)

	p := startVMM(t, dir)
	p.loadFile(vmstateOld, memNew, false, true)
	st := p.waitTicks(100)
	if st.IntegrityErrors == 0 || !strings.Contains(st.FirstIntegrityError, "different moments") {
		t.Fatalf("old vmstate over new memory: %d integrity errors, first %q; want the step-counter mismatch reported",
			st.IntegrityErrors, st.FirstIntegrityError)
	}
}

func TestDiffAfterLoadWritesOnlyDirtyPages(t *testing.T) {
	dir := t.TempDir()
	// No discards: the bound below counts only the workload's page writes.
	args := "forkd.ws_mib=8 forkd.split_mib=16 forkd.rate=20000 forkd.write_pct=10"
	_, vmstate, mem := bootedSnapshot(t, dir, bootSpec{vcpus: 2, memMib: 32, bootArgs: args}, 500)

	p := startVMM(t, dir)
	p.loadFile(vmstate, mem, true, true)
	st := p.waitTicks(400)
	p.pause()
	st = p.guest()
	diff, diffState := filepath.Join(dir, "layer.mem"), filepath.Join(dir, "layer.vmstate")
	p.snapshot("Diff", diffState, diff)

	size, _, _ := fileInfo(t, diff)
	written := dataBytes(t, diff) / pageSize
	tablePages := int64((8<<20/pageSize)*tableEntry/pageSize) + 1
	bound := int64(st.PagesWritten) + tablePages + 1 // data pages, their table pages, the header
	if size != 32<<20 || written == 0 || written > bound {
		t.Fatalf("fresh Diff: size %d, %d pages of data; want size %d and 1..%d pages (%d page writes since load)",
			size, written, 32<<20, bound, st.PagesWritten)
	}

	// A second Diff right away has nothing dirty: the dirty log restarts at
	// each snapshot.
	empty := filepath.Join(dir, "empty.mem")
	p.snapshot("Diff", filepath.Join(dir, "empty.vmstate"), empty)
	if n := dataBytes(t, empty); n != 0 {
		t.Fatalf("Diff with no guest activity since the last snapshot wrote %d bytes, want 0", n)
	}

	// Layer the diff onto a copy of the base (SEEK_DATA copy, as snapshot-editor
	// rebase does) and restore the result with the diff's vmstate.
	merged := filepath.Join(dir, "merged.mem")
	copyFile(t, mem, merged)
	mergeLayer(t, merged, diff)
	q := startVMM(t, dir)
	q.loadFile(diffState, merged, false, true)
	requireClean(t, "base+diff", q.waitTicks(1000))
}

// mergeLayer copies the data extents of diff into base at the same offsets.
func mergeLayer(t *testing.T, base, diff string) {
	t.Helper()
	d, err := os.Open(diff)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	b, err := os.OpenFile(base, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var off int64
	for {
		start, err := unix.Seek(int(d.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		end, _ := unix.Seek(int(d.Fd()), start, unix.SEEK_HOLE)
		buf := make([]byte, end-start)
		if _, err := d.ReadAt(buf, start); err != nil {
			t.Fatal(err)
		}
		if _, err := b.WriteAt(buf, start); err != nil {
			t.Fatal(err)
		}
		off = end
	}
}

func TestDiffIntoRightSizedBaseMergesInPlace(t *testing.T) {
	dir := t.TempDir()
	_, vmstate, mem := bootedSnapshot(t, dir, bootSpec{vcpus: 2, memMib: 32, bootArgs: testBootArgs}, 500)
	_, _, inoBefore := fileInfo(t, mem)

	p := startVMM(t, dir)
	p.loadFile(vmstate, mem, true, true)
	p.waitTicks(1500)
	p.pause()
	steps := p.guest().Steps
	// Write-back into the very file this VM was restored from: safe for this
	// VM (its dirty pages are private copies), and no other VM maps it.
	vmstate2 := filepath.Join(dir, "merged.vmstate")
	p.snapshot("Diff", vmstate2, mem)

	size, allocated, ino := fileInfo(t, mem)
	if ino != inoBefore || size != 32<<20 || allocated < size {
		t.Fatalf("in-place Diff: inode %d→%d, size %d, allocated %d; want the same inode, not truncated, still fully allocated",
			inoBefore, ino, size, allocated)
	}
	q := startVMM(t, dir)
	q.loadFile(vmstate2, mem, false, true)
	st := q.waitTicks(1500)
	requireClean(t, "restored from merged base", st)
	if st.Steps <= steps {
		t.Fatalf("restored from merged base at steps %d, want beyond %d", st.Steps, steps)
	}
}

// The twin of the in-place merge: a file of the wrong size is truncated to
// zero first, so a Diff into it holds only the dirty pages.
func TestDiffIntoWrongSizedFileTruncatesFirst(t *testing.T) {
	dir := t.TempDir()
	p := startVMM(t, dir)
	p.boot(bootSpec{vcpus: 1, memMib: 16, track: true, bootArgs: "forkd.ws_mib=2 forkd.rate=20000"})
	p.waitTicks(200)
	p.pause()
	p.snapshot("Full", filepath.Join(dir, "full.vmstate"), filepath.Join(dir, "full.mem")) // resets the dirty log
	p.resume()
	p.waitTicks(p.guest().Ticks + 200)
	p.pause()
	wrong := filepath.Join(dir, "wrong.mem")
	if err := os.WriteFile(wrong, make([]byte, 1<<20), 0o600); err != nil { // 1 MiB of data, wrong size
		t.Fatal(err)
	}
	p.snapshot("Diff", filepath.Join(dir, "wrong.vmstate"), wrong)
	size, _, _ := fileInfo(t, wrong)
	if n := dataBytes(t, wrong); size != 16<<20 || n >= 1<<20 {
		t.Fatalf("Diff into a 1 MiB file: size %d, %d data bytes; want size %d and only dirty pages (old data truncated)", size, n, 16<<20)
	}
}

// smapsShared sums Shared_Clean and Shared_Dirty over pid's mappings of
// path: page-cache pages of the file (dirty ones not yet written back) that
// another process maps too. Private copies are Private_Dirty, never Shared.
func smapsShared(t *testing.T, pid int, path string) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var total int64
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) >= 5 && strings.Contains(fields[0], "-") && !strings.HasSuffix(fields[0], ":") {
			in = len(fields) >= 6 && fields[5] == path
			continue
		}
		if in && len(fields) == 3 && (fields[0] == "Shared_Clean:" || fields[0] == "Shared_Dirty:") {
			kb, _ := strconv.ParseInt(fields[1], 10, 64)
			total += kb << 10
		}
	}
	return total
}

func TestHardlinkedLoadsSharePageCacheAndNotWrites(t *testing.T) {
	dir := t.TempDir()
	_, vmstate, mem := bootedSnapshot(t, dir, bootSpec{vcpus: 2, memMib: 32, bootArgs: testBootArgs}, 500)
	cases := []struct {
		name       string
		share      func(src, dst string)
		wantShared bool
	}{
		{"hardlink", func(src, dst string) {
			if err := os.Link(src, dst); err != nil {
				t.Fatal(err)
			}
		}, true},
		// The twin: private copies share no page cache, so the check can fail.
		{"copy", func(src, dst string) { copyFile(t, src, dst) }, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := t.TempDir()
			base := filepath.Join(d, "base.mem") // a fresh inode per case
			copyFile(t, mem, base)
			a, b := filepath.Join(d, "a.mem"), filepath.Join(d, "b.mem")
			c.share(base, a)
			c.share(base, b)
			pa, pb := startVMM(t, d), startVMM(t, d)
			pa.loadFile(vmstate, a, false, true)
			pb.loadFile(vmstate, b, false, true)
			pa.waitTicks(3000)
			pb.waitTicks(3000)
			pa.pause()
			pb.pause()
			sa, sb := pa.guest(), pb.guest()
			// Each wrote its own versions with its own lineage; reading the
			// other's bytes would fail the version-table check.
			requireClean(t, "a", sa)
			requireClean(t, "b", sb)
			if sa.PagesWritten == 0 || sb.PagesWritten == 0 {
				t.Fatalf("pages written: a %d, b %d; want both to write", sa.PagesWritten, sb.PagesWritten)
			}
			sharedA := smapsShared(t, pa.cmd.Process.Pid, a)
			sharedB := smapsShared(t, pb.cmd.Process.Pid, b)
			t.Logf("%s: shared page cache of the mem-file mapping: a %d KiB, b %d KiB", c.name, sharedA>>10, sharedB>>10)
			if got := sharedA > 0 && sharedB > 0; got != c.wantShared {
				t.Fatalf("%s: shared page-cache bytes a %d b %d; want shared page cache = %v", c.name, sharedA, sharedB, c.wantShared)
			}
		})
	}
}

// The checker must be able to fail: bytes written into the shared inode
// from outside show up in the clean pages of every VM mapping it.
func TestWriteIntoSharedInodeIsDetectedByTheWorkload(t *testing.T) {
	dir := t.TempDir()
	_, vmstate, mem := bootedSnapshot(t, dir, bootSpec{vcpus: 2, memMib: 32, bootArgs: testBootArgs}, 500)
	a, b := filepath.Join(dir, "a.mem"), filepath.Join(dir, "b.mem")
	for _, l := range []string{a, b} {
		if err := os.Link(mem, l); err != nil {
			t.Fatal(err)
		}
	}
	pa, pb := startVMM(t, dir), startVMM(t, dir)
	pa.loadFile(vmstate, a, false, true)
	pb.loadFile(vmstate, b, false, true)
	requireClean(t, "a before corruption", pa.waitTicks(200))

	f, err := os.OpenFile(mem, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	for off := int64(pageSize); off < 32<<20; off += pageSize { // every page but the header
		if _, err := f.WriteAt([]byte{0xde, 0xad}, off+100); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	for _, p := range []*vmmProc{pa, pb} {
		st := p.waitTicks(p.guest().Ticks + 500)
		if st.IntegrityErrors == 0 || st.FirstIntegrityError == "" {
			t.Fatalf("%s: corruption of the shared mem-file went unnoticed (%+v)", p.name, st)
		}
		t.Logf("%s detected: %d errors, first: %s", p.name, st.IntegrityErrors, st.FirstIntegrityError)
	}
}
