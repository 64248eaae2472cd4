package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/api"
)

func newImageCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "image",
		Short: "Container images as root filesystems: pull, ls, inspect, rm, gc",
		Long: `Images are container images whose layers forkd flattens into an ext4 root
filesystem, one per platform manifest digest; a VM made with --image gets a
private clone of it (a reflink where the filesystem allows: no data copied).

References: a registry reference (alpine:3.20, ghcr.io/org/app@sha256:...;
credentials come from the daemon user's Docker config file), oci:PATH[:TAG] for
an OCI image layout directory, docker-archive:PATH for a docker save tarball.`,
	}
	cmd.AddCommand(newImagePullCommand(), newImageLsCommand(), newImageInspectCommand(),
		newImageRmCommand(), newImageGCCommand())
	return cmd
}

func newImagePullCommand() *cobra.Command {
	var platform string
	cmd := &cobra.Command{
		Use:   "pull REF",
		Short: "Pull an image and build its root filesystem, showing progress",
		Example: `  forkd image pull alpine:3.20
  forkd image pull oci:./layout:v1
  forkd image pull docker-archive:/tmp/app.tar --platform linux/arm64`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := NewClient(cmd)
			if err != nil {
				return err
			}
			start := time.Now()
			im, err := pullWithProgress(cmd, c, api.PullRequest{Ref: absImageRef(args[0]), Platform: platform})
			if err != nil {
				return err
			}
			return printResult(cmd, im, fmt.Sprintf("pulled %s: %s, %s on disk (%s apparent) in %s",
				args[0], shortDigest(im.Digest), humanBytes(im.DiskBytes), humanBytes(im.SizeBytes), ms(time.Since(start))))
		},
	}
	cmd.Flags().StringVar(&platform, "platform", "", "os/arch[/variant] (default: linux/<the daemon host's arch>)")
	return cmd
}

// pullWithProgress pulls through the daemon, drawing progress on stderr:
// one line redrawn in place on a terminal, a line per phase otherwise.
func pullWithProgress(cmd *cobra.Command, c *api.Client, req api.PullRequest) (api.Image, error) {
	w := cmd.ErrOrStderr()
	tty := isTerminal(w)
	last := ""
	im, err := c.PullImage(cmd.Context(), req, func(p api.Pull) {
		line := progressLine(p)
		switch {
		case tty:
			fmt.Fprintf(w, "\r\033[K%s", line)
		case p.Phase != last:
			fmt.Fprintln(w, line)
		}
		last = p.Phase
	})
	if tty {
		fmt.Fprint(w, "\r\033[K")
	}
	if err != nil {
		return api.Image{}, withImageHint(fmt.Errorf("pull %s: %w", req.Ref, err), req.Ref)
	}
	return im, nil
}

func progressLine(p api.Pull) string {
	switch p.Phase {
	case "fetching":
		pct := 0.0
		if p.BytesTotal > 0 {
			pct = 100 * float64(p.BytesDone) / float64(p.BytesTotal)
		}
		return fmt.Sprintf("%s: fetching layer %d/%d, %s of %s (%.0f%%)", p.Ref, min(p.LayersDone+1, p.LayersTotal),
			p.LayersTotal, humanBytes(p.BytesDone), humanBytes(p.BytesTotal), pct)
	case "building":
		return fmt.Sprintf("%s: building the root filesystem (%d layers)", p.Ref, p.LayersTotal)
	case "done":
		return fmt.Sprintf("%s: done", p.Ref)
	default:
		return fmt.Sprintf("%s: %s", p.Ref, p.Phase)
	}
}

// isTerminal reports whether w is a character device (a terminal).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// absImageRef makes the path of an oci: or docker-archive: reference
// absolute: the daemon does not share the CLI's working directory.
func absImageRef(ref string) string {
	for _, t := range []string{"oci:", "docker-archive:"} {
		if p, ok := strings.CutPrefix(ref, t); ok && p != "" && !filepath.IsAbs(p) {
			if abs, err := filepath.Abs(p); err == nil {
				return t + abs
			}
		}
	}
	return ref
}

func withImageHint(err error, ref string) error {
	err = withHint(err, api.ErrNotFound, "no image %q: check the name and tag (a registry reference, oci:PATH[:TAG] or docker-archive:PATH)", ref)
	err = withHint(err, api.ErrUnavailable, "the registry did not answer: check the daemon host's network and the registry's name")
	err = withHint(err, api.ErrNoSpace, "the daemon's data dir is full: free space (`forkd image gc` removes unused images) or lower image_headroom")
	return err
}

func newImageLsCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List images",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runList(cmd, (*api.Client).ListImages, printImages)
		},
	}
}

func printImages(w io.Writer, list []api.Image) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DIGEST\tREFS\tSIZE\tON DISK\tPLATFORM\tLAYERS\tAGE")
	for _, im := range list {
		refs := append([]string(nil), im.Refs...)
		sort.Strings(refs)
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\n", shortDigest(im.Digest), dash(strings.Join(refs, ",")),
			humanBytes(im.SizeBytes), humanBytes(im.DiskBytes), im.Platform, im.Layers, age(im.CreatedAt))
	}
	return tw.Flush()
}

// shortDigest is the first 12 hex digits of a sha256 digest.
func shortDigest(d string) string { return shortID(strings.TrimPrefix(d, "sha256:")) }

func newImageInspectCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "inspect REF...",
		Short: "Show images as JSON, with their entrypoint, cmd, env and working directory",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := NewClient(cmd)
			if err != nil {
				return err
			}
			var out []api.Image
			for _, ref := range args {
				im, err := c.GetImage(cmd.Context(), absImageRef(ref))
				if err != nil {
					return withHint(err, api.ErrNotFound, "no image %q: see `forkd image ls`, or pull it", ref)
				}
				out = append(out, im)
			}
			return printOneOrMany(cmd, out)
		},
	}
}

func newImageRmCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "rm REF|DIGEST...",
		Short: "Delete images (refused while an instance or snapshot uses one)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return removeEach(cmd, "image", args, func(c *api.Client, ctx context.Context, ref string) error {
				err := c.DeleteImage(ctx, absImageRef(ref))
				err = withHint(err, api.ErrInvalidState, "delete the instances and snapshots it names first (`forkd rm`, `forkd snapshot rm`)")
				return withHint(err, api.ErrNotFound, "see `forkd image ls`")
			})
		},
	}
}

func newImageGCCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "gc",
		Aliases: []string{"prune"},
		Short:   "Delete every image no instance or snapshot uses",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := NewClient(cmd)
			if err != nil {
				return err
			}
			res, err := c.GCImages(cmd.Context())
			if err != nil {
				return err
			}
			lines := []string{}
			for _, im := range res.Deleted {
				lines = append(lines, fmt.Sprintf("removed image %s (%s)", shortDigest(im.Digest), dash(strings.Join(im.Refs, ","))))
			}
			lines = append(lines, fmt.Sprintf("%d images removed, %s freed", len(res.Deleted), humanBytes(res.FreedBytes)))
			return printResult(cmd, res, strings.Join(lines, "\n"))
		},
	}
}

// pullForRun makes sure the image of `run --image` is stored, pulling it
// with progress if it is not, and returns its digest, which the create
// request then names (so a tag moving meanwhile changes nothing).
func pullForRun(ctx context.Context, cmd *cobra.Command, c *api.Client, ref string) (string, error) {
	ref = absImageRef(ref)
	if im, err := c.GetImage(ctx, ref); err == nil {
		return im.Digest, nil
	} else if !errors.Is(err, api.ErrNotFound) {
		return "", err
	}
	im, err := pullWithProgress(cmd, c, api.PullRequest{Ref: ref})
	if err != nil {
		return "", err
	}
	return im.Digest, nil
}
