package emulator

import (
	"fmt"
	"os"
)

// huge_pages 2M: guest memory backed by 2 MiB hugetlbfs pages, as
// Firecracker does it (resources.rs, persist.rs, vstate/memory.rs at each
// tag). What the emulator enforces:
//
//   - machine-config: mem_size_mib a multiple of 2 (errMemSize);
//   - hugetlbfs is refused beside a balloon before 1.14, beside an initrd in
//     1.10, in both orders of configuration, with Firecracker's messages.
//     The emulator has no balloon device: its balloon is the workload's
//     discards (forkd.discard_pct > 0), which is also what decides
//     UFFD_FEATURE_EVENT_REMOVE before 1.12. From 1.14 Firecracker accepts a
//     balloon with huge pages but frees nothing (its 4 KiB discards cannot
//     free part of a huge page), so the emulator refuses discards there with
//     its own message: its workload requires a discarded page to read back
//     as zeros;
//   - a snapshot of a hugetlbfs guest loads only through Uffd (refusal of
//     File: refuseFileLoad), always as hugetlbfs (the vmstate's setting; a
//     load cannot switch it), and its handshake announces 2 MiB pages.

// Firecracker's refusals of huge pages beside a balloon or an initrd.
const (
	errMachineBalloon fault = "Machine config error: Firecracker's huge pages support is incompatible with memory ballooning."
	errMachineInitrd  fault = "Machine config error: Firecracker's huge pages support is incompatible with initrds."
	errBalloonHuge    fault = "Balloon config error: Firecracker's huge pages support is incompatible with memory ballooning."
	errBootInitrd     fault = "Boot source error: Firecracker's huge pages support is incompatible with initrds."
)

// checkMachineAgainstBoot is the half of Firecracker's update_vm_config that
// checks a machine configuration against the devices already configured:
// the balloon (here the boot args' discards), then the initrd (1.10 only).
// Called with v.mu held, on the merged configuration of every PUT or PATCH.
func (v *vmm) checkMachineAgainstBoot(c machineConfig) error {
	if !c.huge() {
		return nil
	}
	if v.guest.discardPct > 0 {
		if v.rel.hugePagesRefuseBalloon() {
			return errMachineBalloon
		}
		return faultf("Machine config error: huge_pages 2M: the boot args' forkd.discard_pct=%d (the emulated balloon) needs 4 KiB guest pages: "+
			"a discard cannot free part of a 2 MiB page", v.guest.discardPct)
	}
	if v.rel.hugePagesRefuseInitrd() && v.boot != nil && v.boot.InitrdPath != "" {
		return errMachineInitrd
	}
	return nil
}

// checkInitrdAgainstMachine is Firecracker 1.10's first check of PUT
// /boot-source, before it opens any file.
func (v *vmm) checkInitrdAgainstMachine(b bootSource) error {
	if v.machine.huge() && b.InitrdPath != "" && v.rel.hugePagesRefuseInitrd() {
		return errBootInitrd
	}
	return nil
}

// checkBalloonAgainstMachine is Firecracker's set_balloon_device check, at
// the call that configures the emulator's balloon: PUT /boot-source with
// forkd.discard_pct > 0.
func (v *vmm) checkBalloonAgainstMachine(g guestArgs) error {
	if !v.machine.huge() || g.discardPct == 0 {
		return nil
	}
	if v.rel.hugePagesRefuseBalloon() {
		return errBalloonHuge
	}
	return faultf("Boot source error: forkd.discard_pct=%d (the emulated balloon) needs 4 KiB guest pages: "+
		"with huge_pages 2M a discard cannot free part of a 2 MiB page", g.discardPct)
}

// checkHugeLayout refuses, at InstanceStart, a region split that is not a
// whole number of huge pages (forkd.split_mib, a test knob: Firecracker's
// own split at 3 GiB always is).
func checkHugeLayout(regions []region) error {
	for _, r := range regions {
		if r.Size%hugePageSize != 0 {
			return fmt.Errorf("boot_args: forkd.split_mib makes a region of %d bytes; with huge_pages 2M every region must be a whole number of 2 MiB pages (an even forkd.split_mib)", r.Size)
		}
	}
	return nil
}

// refuseFileLoad is Firecracker's refusal to map a hugetlbfs snapshot's
// mem-file (a private file mapping cannot be hugetlbfs): from 1.11 before
// the mem-file is opened (GuestMemoryFromFileError::HugetlbfsSnapshot), in
// 1.10 once it is open (MemoryError::HugetlbfsSnapshot, inside "Failed to
// restore guest memory"), so there a missing mem-file is what is reported.
func (v *vmm) refuseFileLoad(memPath string) error {
	const prefix = "Failed to restore from snapshot: Failed to load guest memory: Error creating guest memory from file: "
	const msg = "Cannot restore hugetlbfs backed snapshot by mapping the memory file. Please use uffd."
	if v.rel.atLeast(1, 11, 0) {
		return fault(prefix + msg)
	}
	f, err := os.Open(memPath)
	if err != nil {
		return fmt.Errorf("open mem file: %w", err)
	}
	f.Close()
	return fault(prefix + "Failed to restore guest memory: " + msg)
}
