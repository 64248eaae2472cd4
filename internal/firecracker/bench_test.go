package firecracker

import (
	"context"
	"path/filepath"
	"testing"
)

// BenchmarkLaunchEmulator is Launch of `forkd vmm` until GET / answers,
// then Kill: the VMM start every restore pays.
func BenchmarkLaunchEmulator(b *testing.B) {
	bin, err := forkdBinary()
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	ctx := context.Background()
	for b.Loop() {
		p, err := Launch(ctx, LaunchSpec{Binary: bin, Args: []string{"vmm"}, APISock: filepath.Join(dir, "b.sock"), LogPath: filepath.Join(dir, "b.log")})
		if err != nil {
			b.Fatal(err)
		}
		if err := p.Kill(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
