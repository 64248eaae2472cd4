package uffd

// The userfaultfd ABI for Linux (x86_64 and arm64 share it). Ioctl numbers
// are _IOWR/_IOR(0xAA, nr, struct) as in <linux/userfaultfd.h>; the struct
// sizes they encode are noted beside each and match the structs in ioctl.go.
const (
	// PageSize is the base page size every 4 KiB-page region uses.
	PageSize = 4096
	// HugePageSize is the 2 MiB hugetlbfs page Firecracker may announce.
	HugePageSize = 2 << 20

	// APIVersion is UFFD_API, the only protocol version the kernel knows.
	APIVersion uint64 = 0xAA

	ioctlNew        = 0xAA00     // USERFAULTFD_IOC_NEW on /dev/userfaultfd, _IO(0xAA, 0)
	ioctlRegister   = 0xC020AA00 // uffdio_register, 32 bytes
	ioctlUnregister = 0x8010AA01 // uffdio_range, 16 bytes
	ioctlWake       = 0x8010AA02 // uffdio_range, 16 bytes
	ioctlCopy       = 0xC028AA03 // uffdio_copy, 40 bytes
	ioctlZeroPage   = 0xC020AA04 // uffdio_zeropage, 32 bytes
	ioctlAPI        = 0xC018AA3F // uffdio_api, 24 bytes

	// UserModeOnly is UFFD_USER_MODE_ONLY: catch only user-mode faults.
	// Never use it for guest memory: KVM faults come from kernel mode.
	UserModeOnly = 1

	devicePath = "/dev/userfaultfd"
)

// Features requested with API (UFFD_FEATURE_*).
const (
	FeaturePagefaultFlagWP  uint64 = 1 << 0
	FeatureEventFork        uint64 = 1 << 1
	FeatureEventRemap       uint64 = 1 << 2
	FeatureEventRemove      uint64 = 1 << 3
	FeatureMissingHugetlbfs uint64 = 1 << 4
	FeatureMissingShmem     uint64 = 1 << 5
	FeatureEventUnmap       uint64 = 1 << 6
	FeatureSigbus           uint64 = 1 << 7
	FeatureThreadID         uint64 = 1 << 8
	FeatureMinorHugetlbfs   uint64 = 1 << 9
	FeatureMinorShmem       uint64 = 1 << 10
	FeatureExactAddress     uint64 = 1 << 11
	FeatureWPHugetlbfsShmem uint64 = 1 << 12
	FeatureWPUnpopulated    uint64 = 1 << 13
	FeaturePoison           uint64 = 1 << 14
	FeatureWPAsync          uint64 = 1 << 15
	FeatureMove             uint64 = 1 << 16
)

// Register modes (UFFDIO_REGISTER_MODE_*).
const (
	RegisterModeMissing uint64 = 1
	RegisterModeWP      uint64 = 2
	RegisterModeMinor   uint64 = 4
)

// Modes of Copy and ZeroPage.
const (
	// CopyModeDontWake installs the page without waking the faulting
	// thread; a later Wake must follow.
	CopyModeDontWake uint64 = 1
	// CopyModeWP installs the page write-protected (needs WP registration).
	CopyModeWP uint64 = 2
	// ZeroPageModeDontWake is ZeroPage's DONTWAKE.
	ZeroPageModeDontWake uint64 = 1
)

// Bits of the ioctls mask Register returns: which range ioctls the kernel
// allows on the registered range (1 << _UFFDIO_nr).
const (
	IoctlWake         uint64 = 1 << 0x02
	IoctlCopy         uint64 = 1 << 0x03
	IoctlZeroPage     uint64 = 1 << 0x04
	IoctlMove         uint64 = 1 << 0x05
	IoctlWriteProtect uint64 = 1 << 0x06
	IoctlContinue     uint64 = 1 << 0x07
	IoctlPoison       uint64 = 1 << 0x08
)

// Events (uffd_msg.event).
const (
	EventPagefault = 0x12
	EventFork      = 0x13
	EventRemap     = 0x14
	EventRemove    = 0x15
	EventUnmap     = 0x16
)

// Flags of a pagefault event (UFFD_PAGEFAULT_FLAG_*).
const (
	PagefaultFlagWrite uint64 = 1
	PagefaultFlagWP    uint64 = 2
	PagefaultFlagMinor uint64 = 4
)

// MsgSize is sizeof(struct uffd_msg).
const MsgSize = 32
