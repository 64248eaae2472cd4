// Package memfile owns every file operation on guest memory files
// ("mem-files"): sharing one for a fork, cloning or copying it, the unshare
// guard, and compressing it for cold storage.
//
// It knows nothing of VMs, instances or snapshots; everything here is a file
// operation on paths the caller chose. It never logs: degraded paths are
// reported through Options.FullCopy and through return values (Mode, Reason),
// so the caller can log and count them.
//
// # Invariants enforced here (docs/architecture.md §3)
//
//   - Fanout is zero-I/O: ShareForFork hardlinks; not one mem-file byte is read
//     or written. Only when linking fails (EXDEV, EMLINK, EPERM, ...) does it
//     fall back to Clone, and it returns the errno name that forced it.
//   - Nobody writes a shared inode: this package never writes a mem-file in
//     place; EnsureExclusive replaces a file whose link count is > 1 with a
//     private copy before its owner's VMM writes a Diff into it, leaving the
//     other links' inode and bytes untouched.
//   - A page of zeros that is data stays data. Copies walk SEEK_DATA/SEEK_HOLE
//     and copy whole data extents; they never look at the bytes to turn zeros
//     into holes, because a base's page of zeros is part of its image.
//   - Crash-safe: Clone, Copy and EnsureExclusive write <name>.tmp or
//     <path>.unshare.tmp, fsync it, rename it over the name and fsync the
//     directory (internal/atomicfile). After a crash the name holds the old
//     file or the new one, never a partial one; the next call removes a stale
//     temp.
//
// # Compressed format (Compress, Decompress)
//
// A compressed mem-file is a sequence of independent zstd frames, one per
// fixed-size chunk of the original (FrameSize, 4 MiB by default; the last
// chunk may be shorter), followed by an index and a fixed-size footer:
//
//	frame 0 | frame 1 | ... | frame N-1 | index | footer
//
//	index  = N entries of 16 bytes, little-endian:
//	           offset u64  (byte offset of the frame in the file)
//	           length u32  (compressed length; 0 = the chunk is all zeros and
//	                        has no frame: it is restored as a hole)
//	           crc32c u32  (Castagnoli CRC of the uncompressed chunk; 0 for a
//	                        zero chunk)
//	footer = 40 bytes, little-endian:
//	           magic      [8]byte "FORKDZS1"
//	           size       u64 (uncompressed size of the original file)
//	           frameSize  u64 (uncompressed bytes per frame)
//	           indexOff   u64 (byte offset of the index)
//	           indexCRC   u32 (crc32c of the index bytes)
//	           reserved   u32 (0)
//
// A reader reads the footer, then the index, and can decompress any frame
// alone, so ReadAt of a range decompresses only the frames it covers. Every
// frame is a standard zstd frame (without zstd's own checksum: the index has
// one), so `zstd -d` of one frame's bytes works too.
//
// Compress does not read chunks that are holes in the source. Decompress
// leaves every page of zeros as a hole (zero chunks and zero pages inside
// data frames alike): the result reads back byte for byte the same and is as
// sparse as it can be. That makes it a full image, never a diff layer: in a
// diff, a hole means "clean page", so compress only full mem-files.
package memfile
