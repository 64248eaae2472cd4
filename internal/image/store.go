package image

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"

	"github.com/forkd/forkd/internal/atomicfile"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/rootfs"
	"github.com/forkd/forkd/internal/store"
)

// Journal kinds and steps of the store's operations (the reconciler reads
// them; the crash suite kills the daemon at each).
const (
	KindPull   = "image-pull"   // subject: digest; steps begun → built → stored
	KindDelete = "image-delete" // subject: digest; its body is re-run
	StepBuilt  = "built"        // rootfs.ext4 and image.json complete in the temp dir
	StepStored = "stored"       // the temp dir renamed into place
)

// JournalSteps lists the steps of the store's journalled operations (each
// starts with "begun"), for the manager's one list of crash points.
func JournalSteps() map[string][]string {
	return map[string][]string{
		KindPull:   {"begun", StepBuilt, StepStored},
		KindDelete: {"begun"},
	}
}

// DefaultHeadroom is the free space an image's filesystem gets beyond its
// content when the daemon's image_headroom is not set.
const DefaultHeadroom = 256 << 20

// Config is what a Store is built from.
type Config struct {
	Layout guestdir.Layout
	DB     *store.Store
	// Headroom is the free space each image's filesystem gets beyond its
	// content (0: DefaultHeadroom).
	Headroom int64
	// Keychain supplies registry credentials (nil: the Docker config file
	// of the daemon's user, $DOCKER_CONFIG or ~/.docker/config.json).
	Keychain authn.Keychain
	// Transport, when set, carries registry requests (tests).
	Transport http.RoundTripper
	// StepHook runs after each journal step is durable (the crash suite's
	// hook); nil does nothing.
	StepHook func(kind, step string)
	// BuildDone hears how each build ended and how long it took (metrics);
	// nil does nothing.
	BuildDone func(d time.Duration, err error)
	Logger    *slog.Logger
	// IgnoreWhiteouts drops whiteout handling when flattening layers. It
	// exists only for the twin test that shows the content check catches
	// it; never set it elsewhere.
	IgnoreWhiteouts bool
}

// Store owns the images under the data dir: pulling and building them
// (one download and build per digest, however many pull it at once),
// their records and tags, deleting them and settling what a crash left.
type Store struct {
	cfg Config
	db  *store.Store
	log *slog.Logger

	// ctx bounds builds (they outlive the request that started them, so a
	// second puller can share one); Close cancels it and waits.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// mu guards the maps below. Lock order: a digest's lock → mu →
	// pullOp.mu → buildCall.mu; mu is never held across I/O.
	mu sync.Mutex
	// builds: the build in flight for each digest.
	builds map[string]*buildCall
	// locks: per digest; users of the files (a VM's disk clone) read,
	// delete writes.
	locks map[string]*sync.RWMutex
	// pulls: pull operations a client may poll (pulls.go).
	pulls map[string]*pullOp
}

// New returns a Store. The caller must Close it.
func New(cfg Config) *Store {
	if cfg.Headroom <= 0 {
		cfg.Headroom = DefaultHeadroom
	}
	if cfg.Keychain == nil {
		cfg.Keychain = authn.DefaultKeychain
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.StepHook == nil {
		cfg.StepHook = func(string, string) {}
	}
	if cfg.BuildDone == nil {
		cfg.BuildDone = func(time.Duration, error) {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Store{cfg: cfg, db: cfg.DB, log: cfg.Logger, ctx: ctx, cancel: cancel,
		builds: map[string]*buildCall{}, locks: map[string]*sync.RWMutex{}, pulls: map[string]*pullOp{}}
}

// Close cancels builds in flight and waits for them (their temp dirs are
// removed; a crash instead leaves them to Reconcile).
func (s *Store) Close() {
	s.cancel()
	s.wg.Wait()
}

// Image is a stored image.
type Image struct {
	store.Image
	Run RunConfig
}

func fromRecord(r store.Image) Image {
	im := Image{Image: r}
	_ = json.Unmarshal([]byte(r.Config), &im.Run)
	return im
}

func (s *Store) lock(digest string) *sync.RWMutex {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.locks[digest]
	if !ok {
		l = &sync.RWMutex{}
		s.locks[digest] = l
	}
	return l
}

// Lookup finds a stored image by reference (canonical form), digest
// ("sha256:…", with or without the algorithm) or unique digest prefix.
func (s *Store) Lookup(ctx context.Context, ref string) (Image, error) {
	if d, err := s.db.ImageByRef(ctx, Canonical(ref)); err == nil {
		return s.get(ctx, d)
	} else if !errors.Is(err, store.ErrNotFound) {
		return Image{}, err
	}
	hex := strings.TrimPrefix(ref, "sha256:")
	if len(hex) >= 4 && len(hex) <= 64 && strings.Trim(hex, "0123456789abcdef") == "" {
		ds, err := s.db.ImageDigestsWithPrefix(ctx, "sha256:"+hex)
		if err != nil {
			return Image{}, err
		}
		switch len(ds) {
		case 1:
			return s.get(ctx, ds[0])
		case 2:
			return Image{}, fmt.Errorf("%w: %q is a prefix of more than one image digest", ErrInvalidRef, ref)
		}
	}
	return Image{}, fmt.Errorf("%w: no image %q here (pull it first, or see the list)", ErrNotFound, ref)
}

func (s *Store) get(ctx context.Context, digest string) (Image, error) {
	r, err := s.db.GetImage(ctx, digest)
	if errors.Is(err, store.ErrNotFound) {
		return Image{}, fmt.Errorf("%w: %s", ErrNotFound, digest)
	}
	return fromRecord(r), err
}

// List returns every stored image.
func (s *Store) List(ctx context.Context) ([]Image, error) {
	rs, err := s.db.ListImages(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]Image, 0, len(rs))
	for _, r := range rs {
		out = append(out, fromRecord(r))
	}
	return out, nil
}

// Acquire returns the image ref names, pulling it first if it is not
// stored, and holds it: it cannot be deleted until release is called.
// Callers hold it while they clone its rootfs and record that they use it.
func (s *Store) Acquire(ctx context.Context, ref string) (Image, func(), error) {
	for attempt := 0; ; attempt++ {
		im, err := s.Lookup(ctx, ref)
		if errors.Is(err, ErrNotFound) && attempt == 0 && !strings.HasPrefix(ref, "sha256:") {
			// A digest names only what is stored: "sha256:…" would
			// otherwise parse as Docker Hub's repository "sha256".
			im, err = s.Pull(ctx, ref, "", nil)
		}
		if err != nil {
			return Image{}, nil, err
		}
		l := s.lock(im.Digest)
		l.RLock()
		// A delete may have won the race between lookup and lock.
		if _, err := s.db.GetImage(ctx, im.Digest); err == nil {
			return im, l.RUnlock, nil
		}
		l.RUnlock()
		if attempt > 0 {
			return Image{}, nil, fmt.Errorf("%w: %s was deleted while in use", ErrNotFound, ref)
		}
	}
}

// Rootfs is the path of a stored image's ext4 file (hold it with Acquire
// while reading it).
func (s *Store) Rootfs(digest string) (string, error) {
	d, err := s.cfg.Layout.Image(digest)
	return d.Rootfs(), err
}

// Pull resolves ref for platform ("" for the host's), and builds and stores
// the image unless its digest is stored already; either way ref then points
// at it. Concurrent pulls of one digest share one download and build;
// progress (may be nil) hears how it goes. A failure leaves nothing behind.
func (s *Store) Pull(ctx context.Context, ref, platform string, progress func(Progress)) (Image, error) {
	if progress == nil {
		progress = func(Progress) {}
	}
	r, err := ParseRef(ref)
	if err != nil {
		return Image{}, err
	}
	if platform == "" {
		platform = DefaultPlatform()
	}
	p, err := ParsePlatform(platform)
	if err != nil {
		return Image{}, err
	}
	progress(Progress{Phase: PhaseResolving})
	src, err := resolve(ctx, r, p, s.cfg.Keychain, s.cfg.Transport)
	if err != nil {
		return Image{}, fmt.Errorf("pull %s: %w", ref, err)
	}
	if _, err := s.db.GetImage(ctx, src.digest); err != nil {
		if !errors.Is(err, store.ErrNotFound) {
			return Image{}, err
		}
		if err := s.buildOnce(ctx, r, src, progress); err != nil {
			return Image{}, fmt.Errorf("pull %s: %w", ref, err)
		}
	}
	if err := s.db.SetImageRefs(ctx, src.digest, r.String()); err != nil {
		// Deleted between build and tag: pulling again rebuilds it.
		return Image{}, fmt.Errorf("pull %s: %w", ref, err)
	}
	im, err := s.get(ctx, src.digest)
	if err == nil {
		progress(Progress{Phase: PhaseDone, LayersDone: im.Layers, LayersTotal: im.Layers})
	}
	return im, err
}

// buildCall is one build in flight; every puller of its digest waits on it.
type buildCall struct {
	done chan struct{}
	err  error // set before done is closed

	mu   sync.Mutex // guards subs and last
	subs []func(Progress)
	last Progress
}

func (b *buildCall) report(p Progress) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.last = p
	for _, f := range b.subs {
		f(p)
	}
}

func (b *buildCall) subscribe(f func(Progress)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.subs = append(b.subs, f)
	if b.last.Phase != "" {
		f(b.last)
	}
}

// buildOnce builds src's digest, or joins the build already running for
// it. The build runs on the store's context, not the caller's: a caller
// giving up does not fail the others waiting on it.
func (s *Store) buildOnce(ctx context.Context, r Ref, src source, progress func(Progress)) error {
	s.mu.Lock()
	b, running := s.builds[src.digest]
	if !running {
		b = &buildCall{done: make(chan struct{})}
		s.builds[src.digest] = b
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			start := time.Now()
			b.err = s.buildAndStore(s.ctx, r, src, b.report)
			s.cfg.BuildDone(time.Since(start), b.err)
			s.mu.Lock()
			delete(s.builds, src.digest)
			s.mu.Unlock()
			close(b.done)
		}()
	}
	s.mu.Unlock()
	b.subscribe(progress)
	select {
	case <-b.done:
		return b.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// meta is image.json: the record, written into the dir before it is
// renamed into place, so a crash between rename and record can be finished.
type meta struct {
	Digest   string `json:"digest"`
	Platform string `json:"platform"`
	Ref      string `json:"ref"`
	built
}

// buildAndStore is the journalled build: begun → (temp dir: unpack, mkfs,
// image.json, fsync) built → (rename into place) stored → record and tag.
func (s *Store) buildAndStore(ctx context.Context, r Ref, src source, progress func(Progress)) (err error) {
	start := time.Now()
	tmp, err := s.cfg.Layout.TempImage(src.digest)
	if err != nil {
		return err
	}
	final, _ := s.cfg.Layout.Image(src.digest)
	// Exclusive: a delete of this digest waits, and a build that finished
	// between our caller's lookup and now is not redone (nor its dir
	// removed below).
	l := s.lock(src.digest)
	l.Lock()
	defer l.Unlock()
	if _, err := s.db.GetImage(ctx, src.digest); err == nil {
		return nil
	}
	jid, err := s.db.Begin(ctx, KindPull, src.digest, map[string]string{"ref": r.String()})
	if err != nil {
		return err
	}
	s.cfg.StepHook(KindPull, "begun")
	defer func() {
		outcome := "done"
		if err != nil {
			os.RemoveAll(tmp.Dir)
			os.RemoveAll(final.Dir)
			outcome = "failed: " + err.Error()
		}
		if ferr := s.db.Finish(context.WithoutCancel(ctx), jid, outcome); ferr != nil {
			s.log.Error("journal finish", "op", KindPull, "image", src.digest, "err", ferr)
		}
	}()
	// A temp dir left by a build that was interrupted without a crash
	// (cancelled) or by a crash not yet reconciled is stale: start afresh.
	os.RemoveAll(tmp.Dir)
	os.RemoveAll(final.Dir)
	if err := os.MkdirAll(tmp.Dir, 0o700); err != nil {
		return noSpace(err)
	}
	b, err := build(ctx, src, tmp, buildOptions{headroom: s.cfg.Headroom, ignoreWhiteouts: s.cfg.IgnoreWhiteouts, progress: progress})
	if err != nil {
		return noSpace(err)
	}
	m := meta{Digest: src.digest, Platform: src.platform, Ref: r.String(), built: b}
	js, _ := json.Marshal(m)
	if err := atomicfile.WriteFile(tmp.Meta(), js, 0o600); err != nil {
		return noSpace(err)
	}
	if err := atomicfile.SyncDir(tmp.Dir); err != nil {
		return err
	}
	if err := s.db.Step(ctx, jid, StepBuilt, nil); err != nil {
		return err
	}
	s.cfg.StepHook(KindPull, StepBuilt)
	if err := atomicfile.Rename(tmp.Dir, final.Dir); err != nil {
		return err
	}
	if err := s.db.Step(ctx, jid, StepStored, nil); err != nil {
		return err
	}
	s.cfg.StepHook(KindPull, StepStored)
	if err := s.record(ctx, m); err != nil {
		return err
	}
	s.log.Info("image built", "image", src.digest, "ref", r.String(), "layers", b.Layers,
		"size_bytes", b.SizeBytes, "disk_bytes", b.DiskBytes, "duration", time.Since(start))
	return nil
}

func (s *Store) record(ctx context.Context, m meta) error {
	cfg, _ := json.Marshal(m.Config)
	return s.db.CreateImage(ctx, store.Image{Digest: m.Digest, SizeBytes: m.SizeBytes, DiskBytes: m.DiskBytes,
		ContentBytes: m.ContentBytes, Platform: m.Platform, Config: string(cfg), Layers: m.Layers,
		CreatedAt: time.Now().UTC()}, m.Ref)
}

// noSpace marks ENOSPC (from the host, or mkfs running out of room) so the
// API can say the disk is full.
func noSpace(err error) error {
	if errors.Is(err, syscall.ENOSPC) && !errors.Is(err, rootfs.ErrNoSpace) {
		return fmt.Errorf("%w: %v", rootfs.ErrNoSpace, err)
	}
	return err
}
