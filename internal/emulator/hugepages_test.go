package emulator

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"hash/crc64"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/forkd/forkd/internal/capacity"
	"github.com/forkd/forkd/internal/jail"
	"github.com/forkd/forkd/internal/testenv"
)

// hugeBootArgs: a 16 MiB guest in two 8 MiB regions (four 2 MiB pages
// each), no discards (refused beside huge pages).
const hugeBootArgs = "forkd.ws_mib=6 forkd.split_mib=8 forkd.rate=20000 forkd.write_pct=30"

// hugeGuestPages is what one 16 MiB hugetlbfs guest takes from the pool.
const hugeGuestPages = 16 << 20 / hugePageSize

// hugetlbMappings reads pid's smaps: the total size of its mappings whose
// kernel page size is 2 MiB, and of the hugetlbfs pages they hold.
func hugetlbMappings(t testing.TB, pid int) (mapped, resident int64) {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var size int64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) != 3 || fields[2] != "kB" {
			continue
		}
		kb, _ := strconv.ParseInt(fields[1], 10, 64)
		switch fields[0] {
		case "Size:":
			size = kb << 10
		case "KernelPageSize:":
			if kb == 2048 {
				mapped += size
			}
		case "Private_Hugetlb:", "Shared_Hugetlb:":
			resident += kb << 10
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return mapped, resident
}

// bootHugeSnapshot boots a 16 MiB huge_pages 2M guest as release ver in
// dir, checks it holds its RAM in 2 MiB hugetlbfs pages, runs it, pauses it
// and writes a Full snapshot.
func bootHugeSnapshot(t testing.TB, dir, ver string) (p *vmmProc, vmstate, mem string) {
	t.Helper()
	p = startVMMVersion(t, dir, ver)
	p.boot(bootSpec{vcpus: 2, memMib: 16, track: true, huge: true, bootArgs: hugeBootArgs})
	// InstanceStart claimed every page from the pool (claimHugePages).
	if mapped, resident := hugetlbMappings(t, p.cmd.Process.Pid); mapped != 16<<20 || resident != 16<<20 {
		t.Fatalf("booted huge_pages 2M guest: %d bytes mapped in 2 MiB pages, %d resident; want all 16 MiB of guest RAM both", mapped, resident)
	}
	var mc machineConfig
	if err := json.Unmarshal([]byte(p.must("GET", "/machine-config", nil, 200)), &mc); err != nil || mc.HugePages != "2M" {
		t.Fatalf("GET /machine-config: %+v (%v), want huge_pages 2M", mc, err)
	}
	requireClean(t, "booted huge guest", p.waitTicks(3000))
	p.pause()
	vmstate, mem = filepath.Join(dir, "huge.vmstate"), filepath.Join(dir, "huge.mem")
	p.snapshot("Full", vmstate, mem)
	return p, vmstate, mem
}

// loadUffdVersion loads vmstate through the handler at sock and resumes,
// with dirty tracking (under the name the release knows).
func (p *vmmProc) loadUffdVersion(rel release, vmstate, sock string) {
	p.t.Helper()
	track := "enable_diff_snapshots"
	if rel.atLeast(1, 13, 0) {
		track = "track_dirty_pages"
	}
	p.must("PUT", "/snapshot/load", map[string]any{"snapshot_path": vmstate,
		"mem_backend": map[string]any{"backend_type": "Uffd", "backend_path": sock}, track: true, "resume_vm": true}, 204)
}

// A huge_pages 2M guest boots in hugetlbfs memory, and its snapshot restores
// through a uffd handler in 2 MiB pages: the handshake announces 2 MiB per
// region (page_size from 1.12, page_size_kib always, in bytes), region bases
// are 2 MiB aligned, the restored mapping is hugetlbfs, the workload finds
// every page intact, and a Diff (dirty log in 4 KiB pages) merged into the
// base restores intact again. The test handler copies in the page size the
// handshake announces, so a handshake saying 4 KiB fails the restore (its
// copies into hugetlbfs are EINVAL).
func TestHugePagesGuestRestoresThroughUffdIn2MiBPages(t *testing.T) {
	requireUffd(t)
	for _, ver := range []string{"1.11", "1.16"} {
		t.Run(ver, func(t *testing.T) {
			rel, _, err := lookupRelease(ver)
			if err != nil {
				t.Fatal(err)
			}
			// The booted guest, the restored one and the Diff's restore.
			testenv.HugePages(t, 3*hugeGuestPages)
			dir := t.TempDir()
			_, vmstate, mem := bootHugeSnapshot(t, dir, ver)

			sock := filepath.Join(dir, "uffd.sock")
			pager := startTestPager(t, sock, mem, false)
			p := startVMMVersion(t, dir, ver)
			p.loadUffdVersion(rel, vmstate, sock)
			requireClean(t, "uffd restore of a huge guest", p.waitTicks(3000))
			pager.check(t)
			if pager.faults.Load() == 0 {
				t.Fatalf("the handler served no fault")
			}
			checkHugeHandshake(t, rel, pager)
			mapped, resident := hugetlbMappings(t, p.cmd.Process.Pid)
			if mapped != 16<<20 || resident == 0 || resident%hugePageSize != 0 {
				t.Fatalf("restored guest: %d bytes mapped in 2 MiB pages, %d resident; want 16 MiB mapped and whole huge pages installed", mapped, resident)
			}
			var mc machineConfig
			if err := json.Unmarshal([]byte(p.must("GET", "/machine-config", nil, 200)), &mc); err != nil || mc.HugePages != "2M" {
				t.Fatalf("GET /machine-config after the load: %+v (%v), want the snapshot's huge_pages 2M", mc, err)
			}

			// A Diff of the restored guest, merged into a copy of the base,
			// restores intact.
			p.pause()
			merged, vmstate2 := filepath.Join(dir, "merged.mem"), filepath.Join(dir, "diff.vmstate")
			copyFile(t, mem, merged)
			p.snapshot("Diff", vmstate2, merged)
			sock2 := filepath.Join(dir, "uffd2.sock")
			pager2 := startTestPager(t, sock2, merged, false)
			q := startVMMVersion(t, dir, ver)
			q.loadUffdVersion(rel, vmstate2, sock2)
			requireClean(t, "uffd restore of a Diff merged into its base", q.waitTicks(3000))
			pager2.check(t)
		})
	}
}

// checkHugeHandshake checks the handshake as sent: per region 2 MiB in
// page_size_kib (bytes), and in page_size exactly from 1.12.
func checkHugeHandshake(t *testing.T, rel release, pager *testPager) {
	t.Helper()
	pager.mu.Lock()
	raw := pager.raw
	pager.mu.Unlock()
	var regions []map[string]json.Number
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.UseNumber()
	if err := dec.Decode(&regions); err != nil || len(regions) != 2 {
		t.Fatalf("handshake %s: %v, want two regions", raw, err)
	}
	num := func(r map[string]json.Number, k string) uint64 {
		n, err := strconv.ParseUint(string(r[k]), 10, 64)
		if err != nil {
			t.Fatalf("handshake %s: %s: %v", raw, k, err)
		}
		return n
	}
	for i, r := range regions {
		_, hasPageSize := r["page_size"]
		if hasPageSize != rel.atLeast(1, 12, 0) || (hasPageSize && num(r, "page_size") != hugePageSize) ||
			num(r, "page_size_kib") != hugePageSize {
			t.Errorf("%s handshake region %d: %s; want page_size_kib %d and page_size %d only from 1.12", rel, i, raw, hugePageSize, hugePageSize)
		}
		if base := num(r, "base_host_virt_addr"); base%hugePageSize != 0 {
			t.Errorf("handshake region %d: base %#x is not 2 MiB aligned", i, base)
		}
		if off, size := num(r, "offset"), num(r, "size"); off != uint64(i)*8<<20 || size != 8<<20 {
			t.Errorf("handshake region %d: offset %d size %d, want two contiguous 8 MiB regions", i, off, size)
		}
	}
}

// Firecracker restores a hugetlbfs snapshot only through Uffd: a File load
// is refused with its message (1.10 opens the mem-file first, so there a
// missing one is what is reported), and leaves the process unusable.
func TestHugePagesSnapshotRefusesFileLoad(t *testing.T) {
	const msg = "Cannot restore hugetlbfs backed snapshot by mapping the memory file. Please use uffd."
	const prefix = "Load snapshot error: Failed to restore from snapshot: Failed to load guest memory: Error creating guest memory from file: "
	for _, tc := range []struct{ ver, want string }{
		{"1.10", prefix + "Failed to restore guest memory: " + msg},
		{"1.11", prefix + msg},
		{"1.16", prefix + msg},
	} {
		t.Run(tc.ver, func(t *testing.T) {
			testenv.HugePages(t, hugeGuestPages)
			dir := t.TempDir()
			_, vmstate, mem := bootHugeSnapshot(t, dir, tc.ver)
			p := startVMMVersion(t, dir, tc.ver)
			code, out := p.call("PUT", "/snapshot/load", map[string]any{"snapshot_path": vmstate,
				"mem_backend": map[string]any{"backend_type": "File", "backend_path": mem}, "resume_vm": true})
			var f struct {
				FaultMessage string `json:"fault_message"`
			}
			if code != 400 || json.Unmarshal([]byte(out), &f) != nil || f.FaultMessage != tc.want {
				t.Fatalf("File load of a huge_pages 2M snapshot: %d %s\nwant 400 with fault_message %q", code, out, tc.want)
			}
			p.fault("PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 16}, "unusable")

			q := startVMMVersion(t, dir, tc.ver)
			missing := "no such file or directory"
			if tc.ver != "1.10" {
				missing = msg // refused before the mem-file is opened
			}
			q.fault("PUT", "/snapshot/load", map[string]any{"snapshot_path": vmstate,
				"mem_backend": map[string]any{"backend_type": "File", "backend_path": filepath.Join(dir, "nope")}}, missing)
		})
	}
}

// huge_pages 2M beside a balloon (the emulator's: forkd.discard_pct > 0) or
// an initrd, in both orders of configuration, per release: Firecracker
// refuses a balloon before 1.14 and an initrd in 1.10, with its messages;
// from 1.14 it accepts a balloon, and the emulator refuses its discards
// with its own message. A refusal changes nothing. Also the memory size
// rule (whole 2 MiB pages) and an unknown page size.
func TestHugePagesBesideBalloonOrInitrdFollowTheRelease(t *testing.T) {
	dir := t.TempDir()
	kernel, initrd := filepath.Join(dir, "vmlinux"), filepath.Join(dir, "initrd")
	for _, f := range []string{kernel, initrd} {
		if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	huge := map[string]any{"vcpu_count": 1, "mem_size_mib": 32, "huge_pages": "2M"}
	plain := map[string]any{"vcpu_count": 1, "mem_size_mib": 32}
	balloon := map[string]any{"kernel_image_path": kernel, "boot_args": "forkd.discard_pct=5"}
	withInitrd := map[string]any{"kernel_image_path": kernel, "initrd_path": initrd}
	const ownDiscard = "forkd.discard_pct=5 (the emulated balloon) needs 4 KiB guest pages"
	for _, ver := range SupportedVersions() {
		t.Run(ver, func(t *testing.T) {
			rel, _, err := lookupRelease(ver)
			if err != nil {
				t.Fatal(err)
			}
			balloonBoot, balloonMachine := string(errBalloonHuge), string(errMachineBalloon)
			if rel.atLeast(1, 14, 0) {
				balloonBoot, balloonMachine = "Boot source error: "+ownDiscard, "Machine config error: huge_pages 2M: the boot args' "+ownDiscard
			}
			initrdBoot, initrdMachine := "", ""
			if ver == "1.10" {
				initrdBoot, initrdMachine = string(errBootInitrd), string(errMachineInitrd)
			}
			type step struct {
				method, path string
				body         map[string]any
				fault        string // "" for 204
			}
			for _, c := range []struct {
				name  string
				steps []step
			}{
				{"balloon after huge pages", []step{{"PUT", "/machine-config", huge, ""}, {"PUT", "/boot-source", balloon, balloonBoot}}},
				{"huge pages after balloon", []step{{"PUT", "/boot-source", balloon, ""}, {"PUT", "/machine-config", huge, balloonMachine}}},
				{"huge pages patched after balloon", []step{{"PUT", "/machine-config", plain, ""}, {"PUT", "/boot-source", balloon, ""},
					{"PATCH", "/machine-config", map[string]any{"huge_pages": "2M"}, balloonMachine}}},
				{"initrd after huge pages", []step{{"PUT", "/machine-config", huge, ""}, {"PUT", "/boot-source", withInitrd, initrdBoot}}},
				{"huge pages after initrd", []step{{"PUT", "/boot-source", withInitrd, ""}, {"PUT", "/machine-config", huge, initrdMachine}}},
				{"odd memory size", []step{{"PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 33, "huge_pages": "2M"}, string(errMemSize)}}},
				{"huge pages patched onto an odd size", []step{{"PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 33}, ""},
					{"PATCH", "/machine-config", map[string]any{"huge_pages": "2M"}, string(errMemSize)}}},
				{"unknown page size", []step{{"PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 32, "huge_pages": "1G"},
					"unknown variant `1G`, expected `None` or `2M`"}}},
			} {
				p := startVMMVersion(t, dir, ver)
				p.t = t
				var before string
				for _, s := range c.steps {
					if s.fault == "" {
						p.must(s.method, s.path, s.body, 204)
						continue
					}
					before = p.must("GET", "/vm/config", nil, 200)
					code, out := p.call(s.method, s.path, s.body)
					var f struct {
						FaultMessage string `json:"fault_message"`
					}
					if code != 400 || json.Unmarshal([]byte(out), &f) != nil || !strings.Contains(f.FaultMessage, s.fault) {
						t.Errorf("%s: %s %s: %d %s; want 400 with %q", c.name, s.method, s.path, code, out, s.fault)
					}
					if after := p.must("GET", "/vm/config", nil, 200); after != before {
						t.Errorf("%s: a refused %s %s changed the configuration:\n%s\nto\n%s", c.name, s.method, s.path, before, after)
					}
				}
			}
		})
	}
}

// A huge_pages 2M guest split by forkd.split_mib into a region that is not a
// whole number of huge pages is refused at InstanceStart (hugetlbfs maps
// whole 2 MiB pages); nothing is taken from the pool.
func TestHugePagesRefuseARegionOfPartHugePages(t *testing.T) {
	dir := t.TempDir()
	p := startVMM(t, dir)
	kernel := filepath.Join(dir, "vmlinux")
	if err := os.WriteFile(kernel, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	p.must("PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 16, "huge_pages": "2M"}, 204)
	p.must("PUT", "/boot-source", map[string]any{"kernel_image_path": kernel, "boot_args": "forkd.split_mib=7"}, 204)
	p.fault("PUT", "/actions", map[string]any{"action_type": "InstanceStart"}, "every region must be a whole number of 2 MiB pages")
	if got := p.state(); got != "Not started" {
		t.Fatalf("state %q after a refused start, want Not started", got)
	}
}

// The vmstate of a hugetlbfs guest is format 4 (a reader that predates huge
// pages refuses it), every other one stays format 3; a vmstate claiming huge
// pages is refused if its format cannot hold them, its regions are not
// whole huge pages, its workload discards, or its page size is unknown.
func TestHugePagesVMStateFormat(t *testing.T) {
	hugeState := func() *vmState {
		st := testVMState()
		st.Machine.HugePages = "2M"
		return st
	}
	format := func(st *vmState) uint32 {
		data, err := encodeVMState(st)
		if err != nil {
			t.Fatal(err)
		}
		return le.Uint32(data[16:])
	}
	if f := format(testVMState()); f != 3 {
		t.Errorf("a 4 KiB guest's vmstate is format %d, want 3", f)
	}
	if f := format(hugeState()); f != 4 {
		t.Errorf("a huge_pages 2M guest's vmstate is format %d, want 4", f)
	}
	data, err := encodeVMState(hugeState())
	if err != nil {
		t.Fatal(err)
	}
	if got, err := decodeVMState(data); err != nil || !got.Machine.huge() {
		t.Fatalf("decode of a huge_pages 2M vmstate: %+v, %v", got, err)
	}
	for _, c := range []struct {
		name   string
		mutate func(*vmState)
		want   string
	}{
		{"odd region", func(st *vmState) {
			st.Regions[0].Size -= pageSize
			st.Regions[1].Offset -= pageSize
			st.Regions[1].Size += pageSize
		}, "breaks the contiguous layout"},
		{"discards", func(st *vmState) { st.Workload.Config.DiscardPct = 5 }, "discards pages"},
		{"unknown size", func(st *vmState) { st.Machine.HugePages = "1G" }, "neither None nor 2M"},
	} {
		st := hugeState()
		c.mutate(st)
		data, err := encodeVMState(st)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := decodeVMState(data); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: decode = %v, want an error containing %q", c.name, err, c.want)
		}
	}
	// The same body under format 3 (what a VMM without huge pages wrote):
	// refused, not loaded as 4 KiB memory.
	old := bytes.Clone(data)
	le.PutUint32(old[16:], 3)
	end := len(old) - 8
	le.PutUint64(old[end:], crc64.Checksum(old[:end], crcTable()))
	if _, err := decodeVMState(old); err == nil || !strings.Contains(err.Error(), "cannot hold huge_pages 2M") {
		t.Errorf("format 3 vmstate with huge_pages 2M: %v, want refused", err)
	}
}

// hugetlbCgroup makes a cgroup (v2 hugetlb controller) whose processes may
// hold at most pages 2 MiB pages, and returns its dir; cleanup removes it
// (and turns the controller off at the root again if this test turned it
// on and nothing else uses it). Registered before the VMM is started, it is
// removed after the VMM is killed.
func hugetlbCgroup(t *testing.T, pages int) string {
	t.Helper()
	testenv.NeedRoot(t)
	m, err := jail.ReadMounts(jail.MountTable)
	if err != nil || m.Unified == "" {
		testenv.Need(t, testenv.Cgroup, fmt.Sprintf("no cgroup2 hierarchy here (%v): the huge page limit of a VMM is untested", err))
		return ""
	}
	ctrls, err := os.ReadFile(filepath.Join(m.Unified, "cgroup.controllers"))
	if err != nil || !strings.Contains(" "+string(ctrls)+" ", " hugetlb") {
		testenv.Need(t, testenv.Cgroup, fmt.Sprintf("the cgroup2 hierarchy at %s has no hugetlb controller (%q, %v)", m.Unified, ctrls, err))
		return ""
	}
	subtree := filepath.Join(m.Unified, "cgroup.subtree_control")
	on, err := os.ReadFile(subtree)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(" "+string(on)+" ", " hugetlb") {
		if err := os.WriteFile(subtree, []byte("+hugetlb"), 0); err != nil {
			t.Fatalf("enable hugetlb in %s: %v", subtree, err)
		}
		t.Cleanup(func() { os.WriteFile(subtree, []byte("-hugetlb"), 0) }) // EBUSY if another cgroup uses it: left on
	}
	dir := filepath.Join(m.Unified, fmt.Sprintf("forkdtest-%d-hugetlb-%s", os.Getpid(), strings.ReplaceAll(t.Name(), "/", "-")))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.Remove(dir); err != nil {
			t.Errorf("remove test cgroup %s: %v", dir, err)
		}
	})
	limit := filepath.Join(dir, "hugetlb.2MB.max")
	if err := os.WriteFile(limit, []byte(strconv.Itoa(pages*hugePageSize)), 0); err != nil {
		t.Fatalf("set %s: %v", limit, err)
	}
	return dir
}

// A pool that cannot give a huge_pages 2M guest all its pages fails
// InstanceStart with a message naming nr_hugepages and how many pages the
// guest needs, instead of the SIGBUS a real Firecracker takes later; the
// process stays usable (Not started). The shortage is a hugetlb cgroup limit
// on the VMM (2 of the 8 pages it needs), so the test never takes pages other
// tests on the host grew the pool for. The twin: the same guest in a
// cgroup whose limit fits it boots.
func TestHugePagesPoolTooSmallFailsInstanceStart(t *testing.T) {
	for _, tc := range []struct {
		name  string
		limit int
		fits  bool
	}{{"short", 2, false}, {"enough", hugeGuestPages, true}} {
		t.Run(tc.name, func(t *testing.T) {
			testenv.HugePages(t, hugeGuestPages)
			cg := hugetlbCgroup(t, tc.limit)
			dir := t.TempDir()
			p := startVMM(t, dir)
			if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), []byte(strconv.Itoa(p.cmd.Process.Pid)), 0); err != nil {
				t.Fatalf("move the VMM into %s: %v", cg, err)
			}
			t.Cleanup(func() { p.cmd.Process.Kill(); <-p.exited }) // before the cgroup's removal
			if tc.fits {
				p.boot(bootSpec{vcpus: 1, memMib: 16, huge: true, bootArgs: hugeBootArgs})
				requireClean(t, "huge guest within its limit", p.waitTicks(100))
				return
			}
			kernel := filepath.Join(dir, "vmlinux")
			if err := os.WriteFile(kernel, []byte("x"), 0o644); err != nil {
				t.Fatal(err)
			}
			p.must("PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 16, "huge_pages": "2M"}, 204)
			p.must("PUT", "/boot-source", map[string]any{"kernel_image_path": kernel, "boot_args": hugeBootArgs}, 204)
			p.fault("PUT", "/actions", map[string]any{"action_type": "InstanceStart"},
				"Cannot start microvm: guest memory (huge_pages 2M) needs 8 free 2 MiB huge pages for its 16 MiB")
			p.fault("PUT", "/actions", map[string]any{"action_type": "InstanceStart"}, capacity.NrHugePagesPath)
			if got := p.state(); got != "Not started" {
				t.Fatalf("state %q after a start the pool refused, want Not started", got)
			}
			if _, resident := hugetlbMappings(t, p.cmd.Process.Pid); resident != 0 {
				t.Fatalf("%d bytes of huge pages still held after the refused start, want none", resident)
			}
		})
	}
}
