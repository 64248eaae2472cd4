package emulator

import (
	"encoding/binary"
	"fmt"
	"os"
	"time"
)

// diskRecordMagic opens the record a guest with forkd.disk_write=1 writes
// at the start of its root drive each time it boots or is loaded.
const diskRecordMagic = "FORKDDSK"

// writeDiskRecord is the guest writing its disk, for a guest that asks
// (forkd.disk_write=1): the first 512 bytes of the root drive get a record
// of this run (magic, the lineage of this boot or load, the wall clock),
// flushed as a guest's fsync would (virtio-blk flush: Firecracker fsyncs the
// backing file). Firecracker opens a drive read-write at boot and load and
// writes it in place, so a disk another VM shares would take these bytes
// too: this is what lets a test see a VMM given a disk it must not write
// (the manager's disk guard). Ext4 ignores its first 1024 bytes.
func writeDiskRecord(drives []drive, g guestArgs, lineage uint64) error {
	if g.diskWrite == 0 {
		return nil
	}
	for _, d := range drives {
		if !d.IsRootDevice || d.IsReadOnly || d.PathOnHost == "" || d.Socket != "" {
			continue
		}
		f, err := os.OpenFile(d.PathOnHost, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("block device: BackingFile(Os { %v }, %q)", err, d.PathOnHost)
		}
		rec := make([]byte, 512)
		copy(rec, diskRecordMagic)
		binary.LittleEndian.PutUint64(rec[8:], lineage)
		binary.LittleEndian.PutUint64(rec[16:], uint64(time.Now().UnixNano()))
		_, err = f.WriteAt(rec, 0)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("guest disk write %s: %w", d.PathOnHost, err)
		}
	}
	return nil
}
