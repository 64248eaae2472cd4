// Package conformance is the suite `make conformance` runs: forkd's
// lifecycle, standby, fork, snapshot, Uffd and crash scenarios, end to end
// through a real `forkd serve`, against the VMM it is configured with:
//
//   - the emulator (`forkd vmm`), at every supported Firecracker release
//     (FORKD_CONFORMANCE_VERSIONS=all; `go test ./...` runs the newest and
//     the oldest), each as strict as that release;
//   - real Firecracker, with FORKD_CONFORMANCE_FIRECRACKER (default:
//     firecracker in PATH, the jailer beside it), FORKD_CONFORMANCE_KERNEL
//     and FORKD_CONFORMANCE_ROOTFS. Every run has this target: where
//     /dev/kvm, the binaries, the kernel or the rootfs is missing it skips
//     naming each missing piece, and under FORKD_TEST_REQUIRE=kvm it fails.
//
// FORKD_CONFORMANCE_VMM=emulator or =firecracker runs only that kind.
//
// The scenarios assert only what holds for both: with real Firecracker
// there is no GET /guest, so memory_check is "unknown", and the guest's
// memory is checked by the emulator runs alone. The package holds only
// tests.
package conformance
