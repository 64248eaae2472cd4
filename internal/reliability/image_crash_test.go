package reliability

import (
	"context"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/image/imagetest"
	"github.com/forkd/forkd/internal/testenv"
)

// imageCase is the image a crash case pulls: an OCI layout its setup
// writes (outside the data dir), so op and check find it.
type imageCase struct{ ref string }

func (ic *imageCase) write(t *testing.T) {
	testenv.NeedRoot(t) // building a root filesystem sets owners and makes device nodes
	img := imagetest.Image(t, "amd64", v1.Config{Cmd: []string{"/app"}}, imagetest.RichLayers(t, 4<<20)...)
	dir := filepath.Join(t.TempDir(), "layout")
	imagetest.WriteLayout(t, dir, "v1", img)
	ic.ref = "oci:" + dir + ":v1"
}

// imageCrashCases crash the daemon at every step of an image build (pulled
// directly, and pulled by a create that names an image not yet stored), of
// an image delete, and of a create from an image. After the restart the
// checks of every crash case run (images/ must hold only recorded images,
// and every image boots a VM in Exercise), and the image pulls again.
func imageCrashCases() []crashCase {
	var cases []crashCase
	// pullAgain checks the image is recorded after the restart exactly when
	// the crash came once its dir was in place (stored), then pulls again.
	pullAgain := func(ic *imageCase, step string) func(t *testing.T, d *Daemon) {
		return func(t *testing.T, d *Daemon) {
			list, err := d.Client.ListImages(context.Background())
			if want := map[bool]int{true: 1, false: 0}[step == "stored"]; err != nil || len(list) != want {
				t.Errorf("after a crash at image-pull:%s: %d images (%v), want %d", step, len(list), err, want)
			}
			if _, err := d.Client.PullImage(context.Background(), api.PullRequest{Ref: ic.ref}, nil); err != nil {
				t.Errorf("after the crash the image does not pull again: %v", err)
			}
		}
	}
	for _, step := range []string{"begun", "built", "stored"} {
		ic := &imageCase{}
		cases = append(cases, crashCase{at: "image-pull:" + step,
			setup: func(t *testing.T, c *api.Client) { ic.write(t) },
			op: func(ctx context.Context, c *api.Client) error {
				_, err := c.PullImage(ctx, api.PullRequest{Ref: ic.ref}, nil)
				return err
			},
			check: pullAgain(ic, step)})
		ic2 := &imageCase{}
		cases = append(cases, crashCase{at: "image-pull:" + step, variant: "via-create",
			setup: func(t *testing.T, c *api.Client) { ic2.write(t) },
			op: func(ctx context.Context, c *api.Client) error {
				_, err := c.CreateInstance(ctx, api.CreateInstanceRequest{Name: "new", Image: ic2.ref, MemoryMiB: testMemMiB, BootArgs: testBootArgs})
				return err
			},
			check: pullAgain(ic2, step)})
	}
	pulled := func(ic *imageCase) func(t *testing.T, c *api.Client) {
		return func(t *testing.T, c *api.Client) {
			ic.write(t)
			if _, err := c.PullImage(ctxT(t, 60e9), api.PullRequest{Ref: ic.ref}, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	del := &imageCase{}
	cases = append(cases, crashCase{at: "image-delete:begun", setup: pulled(del),
		op: func(ctx context.Context, c *api.Client) error { return c.DeleteImage(ctx, del.ref) },
		check: func(t *testing.T, d *Daemon) {
			if list, err := d.Client.ListImages(context.Background()); err != nil || len(list) != 0 {
				t.Errorf("after a crash in the image's delete: %d images (%v), want the delete finished", len(list), err)
			}
			pullAgain(del, "")(t, d)
		}})
	for _, step := range []string{"begun", "files"} {
		ic := &imageCase{}
		cases = append(cases, crashCase{at: "create:" + step, variant: "from-image", setup: pulled(ic),
			op: func(ctx context.Context, c *api.Client) error {
				_, err := c.CreateInstance(ctx, api.CreateInstanceRequest{Name: "new", Image: ic.ref, DiskSizeMiB: 512, MemoryMiB: testMemMiB, BootArgs: testBootArgs})
				return err
			}})
	}
	return cases
}
