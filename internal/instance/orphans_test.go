package instance

import (
	"strings"
	"testing"
)

func TestParseVMMCmdlineFindsIDAndSocket(t *testing.T) {
	for _, tc := range []struct {
		name, cmdline, id, sock string
		ok                      bool
	}{
		{"forkd vmm", "/usr/bin/forkd vmm --api-sock /d/guests/a/vmm.sock --id a", "a", "/d/guests/a/vmm.sock", true},
		{"forkd vmm, socket relative to its guest dir", "/usr/bin/forkd vmm --api-sock vmm.sock --id a", "a", "vmm.sock", true},
		{"jailed, after the jailer's exec", "/forkd-vmm --id a --start-time-us 1 --start-time-cpu-us 2 --api-sock /vmm.sock", "a", "/vmm.sock", true},
		{"a jailer not yet exec'd", "/usr/bin/jailer --id a --exec-file /x/firecracker --uid 1 --gid 1 -- --api-sock /vmm.sock", "a", "/vmm.sock", true},
		{"= forms", "firecracker --id=a --api-sock=/vmm.sock", "a", "/vmm.sock", true},
		{"no id", "firecracker --api-sock /vmm.sock", "", "/vmm.sock", false},
		{"no socket", "sleep --id a", "a", "", false},
	} {
		p, ok := parseVMMCmdline([]byte(strings.ReplaceAll(tc.cmdline, " ", "\x00") + "\x00"))
		if ok != tc.ok || p.id != tc.id || p.sock != tc.sock {
			t.Errorf("%s: got id %q sock %q ok %v, want %q %q %v", tc.name, p.id, p.sock, ok, tc.id, tc.sock, tc.ok)
		}
	}
}
