package emulator

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"hash/crc64"
	"math/bits"
	"testing"
)

// sealVMState wraps body in a vmstate header and a valid CRC, so the fuzzer
// reaches the body's decoding and validation instead of stopping at the
// checksum.
func sealVMState(body []byte) []byte {
	var b bytes.Buffer
	b.WriteString(vmstateMagic)
	binary.Write(&b, binary.LittleEndian, uint32(vmstateFormatVersion))
	binary.Write(&b, binary.LittleEndian, uint32(0))
	binary.Write(&b, binary.LittleEndian, uint64(len(body)))
	b.Write(body)
	binary.Write(&b, binary.LittleEndian, crc64.Checksum(b.Bytes(), crcTable()))
	return b.Bytes()
}

func validVMStateBody(tb testing.TB) []byte {
	tb.Helper()
	st := &vmState{
		VMMVersion: "fuzz", FirecrackerVersion: "1.13.2", SnapshotVersion: snapshotVersion{8, 0, 0},
		Machine: machineConfig{VCPUCount: 1, MemSizeMib: 16, TrackDirtyPages: true},
		Regions: []region{{GPA: 0, Size: 16 << 20, Offset: 0}},
		Workload: workloadState{
			Config: workloadConfig{VCPUs: 1, WSPages: 256, WritePct: 20, Rate: 100, Seed: 7},
			Steps:  []uint64{42},
		},
	}
	body, err := json.Marshal(st)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := decodeVMState(sealVMState(body)); err != nil {
		tb.Fatalf("the seed vmstate does not decode: %v", err)
	}
	return body
}

// FuzzDecodeVMState feeds arbitrary files to the vmstate decoder: it must
// never panic, and what it accepts must be a state the loader can trust
// (the invariants validate promises, with no arithmetic wrapping).
func FuzzDecodeVMState(f *testing.F) {
	body := validVMStateBody(f)
	sealed := sealVMState(body)
	f.Add(sealed)
	f.Add(sealed[:len(sealed)-1])
	f.Add(sealed[:vmstateHeaderLen])
	f.Add([]byte(vmstateMagic))
	f.Add([]byte{})
	flipped := bytes.Clone(sealed)
	flipped[vmstateHeaderLen+3] ^= 1
	f.Add(flipped)
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := decodeVMState(data)
		if err != nil {
			return
		}
		checkAcceptedVMState(t, st)
	})
}

// FuzzDecodeVMStateBody fuzzes the body under a valid header and CRC: the
// JSON decoding and validate.
func FuzzDecodeVMStateBody(f *testing.F) {
	body := validVMStateBody(f)
	f.Add(body)
	f.Add([]byte(`{}`))
	f.Add([]byte(`null`))
	f.Add(bytes.Replace(body, []byte(`"vcpu_count":1`), []byte(`"vcpu_count":33`), 1))
	f.Add(bytes.Replace(body, []byte(`"mem_size_mib":16`), []byte(`"mem_size_mib":-16`), 1))
	// mem_size_mib -16 with one region of (uint64)(-16)<<20 bytes: only
	// wrapping arithmetic makes these agree.
	neg := bytes.Replace(body, []byte(`"mem_size_mib":16`), []byte(`"mem_size_mib":-16`), 1)
	f.Add(bytes.Replace(neg, []byte(`"size":16777216`), []byte(`"size":18446744073692774400`), 1))
	// Two regions whose sizes wrap to 16 MiB.
	f.Add(bytes.Replace(body, []byte(`"regions":[{"gpa":0,"size":16777216,"offset":0}]`),
		[]byte(`"regions":[{"gpa":0,"size":9223372036854775808,"offset":0},{"gpa":0,"size":9223372036871553024,"offset":9223372036854775808}]`), 1))
	f.Add(bytes.Replace(body, []byte(`"ws_pages":256`), []byte(`"ws_pages":18446744073709551615`), 1))
	f.Fuzz(func(t *testing.T, body []byte) {
		st, err := decodeVMState(sealVMState(body))
		if err != nil {
			return
		}
		checkAcceptedVMState(t, st)
	})
}

func checkAcceptedVMState(t *testing.T, st *vmState) {
	t.Helper()
	if st.Machine.VCPUCount < 1 || st.Machine.VCPUCount > maxVCPUs || len(st.Workload.Steps) != st.Machine.VCPUCount {
		t.Fatalf("accepted inconsistent vCPUs: %+v", st.Machine)
	}
	if st.Machine.MemSizeMib < 1 {
		t.Fatalf("accepted mem_size_mib %d", st.Machine.MemSizeMib)
	}
	var sum uint64
	for _, r := range st.Regions {
		var carry uint64
		sum, carry = bits.Add64(sum, r.Size, 0)
		if carry != 0 {
			t.Fatalf("accepted regions whose sizes overflow: %+v", st.Regions)
		}
	}
	if hi, lo := bits.Mul64(uint64(st.Machine.MemSizeMib), 1<<20); hi != 0 || lo != sum {
		t.Fatalf("accepted regions of %d bytes for %d MiB", sum, st.Machine.MemSizeMib)
	}
	if st.Workload.Config.WSPages > sum/pageSize {
		t.Fatalf("accepted a working set of %d pages in %d pages", st.Workload.Config.WSPages, sum/pageSize)
	}
}
