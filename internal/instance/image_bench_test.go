package instance

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"path/filepath"
	"sort"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/image/imagetest"
	"github.com/forkd/forkd/internal/testfs"
)

// BenchmarkImage measures images per content size (50 MiB, 500 MiB, 2 GiB of
// non-zero data in 1 MiB files, gzip layers of 256 MiB each, read from an OCI
// layout on the same host, so no network time is included), on an XFS and
// an ext4 loopback data dir side by side (ext4 up to 500 MiB):
//
//   - pull-s: one pull (verify, unpack, mkfs.ext4 -d), and image-disk-MiB,
//     what the image's sparse ext4 allocates;
//
//   - vm2-ms: the median of 10 creates (start: false) of another VM of the
//     stored image at the image's own size, the whole API call (journal,
//     record, clone of the ext4); vm2-disk-KiB is what each adds to the
//     filesystem. On XFS the clone is a reflink: flat in image size (budget
//     20 ms); on ext4 it is a sparse copy of the image's data;
//
//   - grow-ms / grow-disk-KiB: the same with disk_size = image + 4 GiB (the
//     clone plus resize2fs), reported apart from vm2;
//
//   - plain-ms: the baseline, measured interleaved with the others: the
//     median create of a VM with no image (a sparse placeholder disk), so
//     vm2-ms - plain-ms is what the image's disk adds.
//
//     go test -run '^$' -bench Image -benchtime 1x -timeout 60m ./internal/instance/
func BenchmarkImage(b *testing.B) {
	for _, kind := range []testfs.Kind{testfs.XFS, testfs.Ext4} {
		sizes := []int64{50, 500, 2048}
		if !kind.Reflink() {
			sizes = sizes[:2] // the copy's cost is linear already; 2 GiB copies 20 times over
		}
		for _, mib := range sizes {
			b.Run(fmt.Sprintf("fs=%s/content=%dMiB", kind, mib), func(b *testing.B) {
				fs := testfs.Mount(b, kind, 24<<30)
				benchImage(b, fs.Dir, mib<<20, !kind.Reflink())
			})
		}
	}
}

func benchImage(b *testing.B, fsDir string, content int64, deleteEach bool) {
	layoutDir := filepath.Join(b.TempDir(), "layout")
	var layers []v1.Layer
	for off := int64(0); off < content; off += 256 << 20 {
		layers = append(layers, benchLayer(b, off>>20, min(256<<20, content-off)))
	}
	imagetest.WriteLayout(b, layoutDir, "", imagetest.Image(b, "amd64", v1.Config{Cmd: []string{"/app"}}, layers...))
	ref := "oci:" + layoutDir
	m := newBenchManager(b, fsDir, benchSetup{})
	ctx := context.Background()

	syscall.Sync()
	start := time.Now()
	im, err := m.images.Pull(ctx, ref, "", nil)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(time.Since(start).Seconds(), "pull-s")
	b.ReportMetric(float64(im.DiskBytes)/(1<<20), "image-disk-MiB")

	f := false
	// create times one create and measures what it added to the
	// filesystem. Where disks are full copies (deleteEach) it then deletes
	// the VM, untimed, so they do not fill the loopback; reflinked ones stay
	// (XFS frees a deleted file's blocks in the background, which would
	// muddle the next measure).
	create := func(name string, diskMiB int) (time.Duration, int64) {
		syscall.Sync()
		before := fsUsed(b, fsDir)
		t0 := time.Now()
		req := api.CreateInstanceRequest{Name: name, Image: im.Digest, DiskSizeMiB: diskMiB, Start: &f}
		if diskMiB < 0 {
			req.Image, req.DiskSizeMiB = "", 0 // the baseline: a VM with a sparse placeholder disk
		}
		in, err := m.CreateInstance(ctx, req)
		if err != nil {
			b.Fatal(err)
		}
		d := time.Since(t0)
		syscall.Sync()
		used := fsUsed(b, fsDir) - before
		if deleteEach && name != "first" {
			if err := m.DeleteInstance(ctx, in.ID); err != nil {
				b.Fatal(err)
			}
		}
		return d, used
	}
	create("first", 0)
	growMiB := int(im.SizeBytes>>20) + 4096
	var vm2, grow, plain []time.Duration
	var vm2Disk, growDisk int64
	for i := 0; i < 10; i++ {
		d, _ := create(fmt.Sprintf("plain-%d", i), -1)
		plain = append(plain, d)
		d, du := create(fmt.Sprintf("vm-%d", i), 0)
		vm2, vm2Disk = append(vm2, d), vm2Disk+du
		d, du = create(fmt.Sprintf("grown-%d", i), growMiB)
		grow, growDisk = append(grow, d), growDisk+du
	}
	b.ReportMetric(median(plain).Seconds()*1000, "plain-ms")
	b.ReportMetric(median(vm2).Seconds()*1000, "vm2-ms")
	b.ReportMetric(float64(vm2Disk)/10/1024, "vm2-disk-KiB")
	b.ReportMetric(median(grow).Seconds()*1000, "grow-ms")
	b.ReportMetric(float64(growDisk)/10/1024, "grow-disk-KiB")
}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func fsUsed(b *testing.B, dir string) int64 {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		b.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

// benchLayer is a gzip layer of size bytes in 1 MiB files of non-zero
// data (every 8 bytes its offset: no holes, compresses well so building
// the layout stays quick), regenerated on each read.
func benchLayer(b *testing.B, first, size int64) v1.Layer {
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		pr, pw := io.Pipe()
		go func() {
			tw := tar.NewWriter(pw)
			buf := make([]byte, 1<<20)
			for i := int64(0); i < size>>20; i++ {
				hdr := &tar.Header{Name: fmt.Sprintf("data/%03d/%06d", (first+i)/256, first+i), Mode: 0o644,
					Size: int64(len(buf)), Typeflag: tar.TypeReg, ModTime: time.Unix(1700000000, 0)}
				for j := 0; j < len(buf); j += 8 {
					binary.LittleEndian.PutUint64(buf[j:], uint64((first+i)<<20+int64(j))|1)
				}
				if err := tw.WriteHeader(hdr); err != nil {
					pw.CloseWithError(err)
					return
				}
				if _, err := tw.Write(buf); err != nil {
					pw.CloseWithError(err)
					return
				}
			}
			pw.CloseWithError(tw.Close())
		}()
		return pr, nil
	}, tarball.WithCompressionLevel(gzip.BestSpeed))
	if err != nil {
		b.Fatal(err)
	}
	return l
}
