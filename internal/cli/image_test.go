package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// imageRecorder is an api.Service for the image commands: its pull goes
// resolving → fetching → building → succeeded over three polls, and it
// records what the CLI asked for.
type imageRecorder struct {
	api.Service
	mu      sync.Mutex // guards the fields below
	pullReq api.PullRequest
	polls   int
	pulled  bool
	created []api.CreateInstanceRequest
}

var recImage = api.Image{Digest: "sha256:" + strings.Repeat("ab", 32), Refs: []string{"oci:/x"}, SizeBytes: 300 << 20,
	DiskBytes: 12 << 20, Platform: "linux/amd64", Layers: 2, CreatedAt: time.Now()}

func (s *imageRecorder) StartPull(_ context.Context, req api.PullRequest) (api.Pull, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pullReq = req
	return api.Pull{ID: "p1", Ref: req.Ref, State: api.PullRunning, Phase: "resolving"}, nil
}

func (s *imageRecorder) GetPull(_ context.Context, id string) (api.Pull, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.polls++
	p := api.Pull{ID: id, Ref: s.pullReq.Ref, State: api.PullRunning, LayersTotal: 2, BytesTotal: 8 << 20}
	switch s.polls {
	case 1:
		p.Phase, p.BytesDone = "fetching", 3<<20
	case 2:
		p.Phase, p.LayersDone, p.BytesDone = "building", 2, 8<<20
	default:
		im := recImage
		p.State, p.Phase, p.Image, s.pulled = api.PullSucceeded, "done", &im, true
	}
	return p, nil
}

func (s *imageRecorder) GetImage(_ context.Context, ref string) (api.Image, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.pulled {
		return api.Image{}, fmt.Errorf("image %q: %w", ref, api.ErrNotFound)
	}
	return recImage, nil
}

func (s *imageRecorder) ListImages(context.Context) ([]api.Image, error) {
	return []api.Image{recImage}, nil
}

func (s *imageRecorder) CreateInstance(_ context.Context, req api.CreateInstanceRequest) (api.Instance, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.created = append(s.created, req)
	return api.Instance{ID: "0123456789abcdef01234567", Name: req.Name, State: api.StateRunning, Image: req.Image}, nil
}

// TestRunWithImagePullsWithProgressThenCreatesFromTheDigest: `run --image`
// on an image the daemon lacks pulls it first (an oci: path made absolute),
// shows each phase, then creates the instance from the pulled digest with
// the disk size in MiB.
func TestRunWithImagePullsWithProgressThenCreatesFromTheDigest(t *testing.T) {
	svc := &imageRecorder{}
	sock := serve(t, svc)
	wd, _ := os.Getwd()
	_, errOut, code := run(t, "--host", sock, "run", "web", "--image", "oci:rel/layout:v1", "--disk-size", "4GiB")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	if want := "oci:" + filepath.Join(wd, "rel/layout:v1"); svc.pullReq.Ref != want {
		t.Errorf("pulled %q, want the absolute %q", svc.pullReq.Ref, want)
	}
	for _, want := range []string{"fetching layer 1/2, 3.0 MiB of 8.0 MiB", "building the root filesystem", "done"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("progress on stderr lacks %q:\n%s", want, errOut)
		}
	}
	if len(svc.created) != 1 || svc.created[0].Image != recImage.Digest || svc.created[0].DiskSizeMiB != 4096 {
		t.Errorf("create requests %+v, want one naming %s with disk_size_mib 4096", svc.created, recImage.Digest)
	}

	// Pulled now: a second run skips the pull.
	polls := svc.polls
	if _, errOut, code := run(t, "--host", sock, "run", "web2", "--image", "oci:/x"); code != 0 || svc.polls != polls {
		t.Errorf("second run: exit %d, %d more polls (want none): %s", code, svc.polls-polls, errOut)
	}
	if _, errOut, code := run(t, "--host", sock, "run", "web3", "--image", "oci:/x", "--disk-size", "1.5G"); code == 0 || !strings.Contains(errOut, "whole number of MiB") {
		t.Errorf("--disk-size 1.5G: exit %d, %s", code, errOut)
	}
	if _, errOut, code := run(t, "--host", sock, "run", "web4", "--image", "oci:/x", "--rootfs", "/r"); code == 0 || !strings.Contains(errOut, "none of the others can be") {
		t.Errorf("--image with --rootfs: exit %d, %s", code, errOut)
	}
}

func TestImageLsJSONHasDigestRefsAndSize(t *testing.T) {
	sock := serve(t, &imageRecorder{})
	out, errOut, code := run(t, "--host", sock, "image", "ls", "-o", "json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var list []map[string]any
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list) != 1 {
		t.Fatalf("image ls -o json: %v\n%s", err, out)
	}
	for _, k := range []string{"digest", "refs", "size_bytes"} {
		if _, ok := list[0][k]; !ok {
			t.Errorf("image ls -o json lacks %q: %s", k, out)
		}
	}
	out, _, _ = run(t, "--host", sock, "image", "ls")
	if !strings.Contains(out, "abababababab") || !strings.Contains(out, "300.0 MiB") {
		t.Errorf("image ls table lacks the short digest or size:\n%s", out)
	}
}
