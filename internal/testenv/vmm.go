package testenv

import "os"

// EnvFirecrackerVersion names the Firecracker release the emulator stands
// for in tests that run VMMs (the driver's, the manager's and the crash
// suite's): `forkd vmm --firecracker-version` for tests that launch it
// themselves, the daemon's emulator_firecracker_version for those that
// start a daemon. Unset: the emulator's default, the newest supported
// release. `make test` runs those packages again at the oldest release.
const EnvFirecrackerVersion = "FORKD_TEST_FIRECRACKER_VERSION"

// FirecrackerVersion is the release tests should ask the emulator for, ""
// for its default.
func FirecrackerVersion() string { return os.Getenv(EnvFirecrackerVersion) }

// EmulatorArgs are the arguments that start forkd's emulator at the
// release FirecrackerVersion names: {"vmm"} plus --firecracker-version when
// one is set.
func EmulatorArgs() []string {
	if v := FirecrackerVersion(); v != "" {
		return []string{"vmm", "--firecracker-version", v}
	}
	return []string{"vmm"}
}
