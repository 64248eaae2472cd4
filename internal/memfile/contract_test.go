package memfile

import (
	"context"
)

// The exported API other packages code against (notes/contracts.md): these
// assignments stop compiling if a signature drifts.
var (
	_ func(src, dst string) (ShareResult, error)                                  = ShareForFork
	_ func(src, dst string) (Mode, error)                                         = Clone
	_ func(path string) (bool, error)                                             = EnsureExclusive
	_ func(ctx context.Context, src, dst string, opt CompressOptions) error       = Compress
	_ func(ctx context.Context, src, dst string, p func(done, total int64)) error = Decompress
	_                                                                             = CompressOptions{Level: 1, Concurrency: 1, FrameSize: 1, Progress: func(done, total int64) {}}
	_                                                                             = Options{FullCopy: func(path string, bytes int64) {}}
)
