package api

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"time"
)

func (c *Client) StartPull(ctx context.Context, req PullRequest) (Pull, error) {
	var p Pull
	err := c.do(ctx, http.MethodPost, "/images/pull", req, &p, http.StatusAccepted)
	return p, err
}

func (c *Client) GetPull(ctx context.Context, id string) (Pull, error) {
	var p Pull
	err := c.do(ctx, http.MethodGet, "/images/pulls/"+url.PathEscape(id), nil, &p, http.StatusOK)
	return p, err
}

func (c *Client) ListImages(ctx context.Context) ([]Image, error) {
	var list []Image
	err := c.do(ctx, http.MethodGet, "/images", nil, &list, http.StatusOK)
	return list, err
}

func (c *Client) GetImage(ctx context.Context, ref string) (Image, error) {
	var im Image
	err := c.do(ctx, http.MethodGet, "/images/"+url.PathEscape(ref), nil, &im, http.StatusOK)
	return im, err
}

func (c *Client) DeleteImage(ctx context.Context, ref string) error {
	return c.do(ctx, http.MethodDelete, "/images/"+url.PathEscape(ref), nil, nil, http.StatusNoContent)
}

func (c *Client) GCImages(ctx context.Context) (ImageGC, error) {
	var res ImageGC
	err := c.do(ctx, http.MethodPost, "/images/gc", nil, &res, http.StatusOK)
	return res, err
}

// PullPollInterval is how often PullImage asks how a pull is going.
const PullPollInterval = 200 * time.Millisecond

// PullImage pulls an image synchronously: it starts the pull and polls it,
// calling progress (may be nil) with every answer, until it succeeds or
// fails. A failed pull returns its error as the daemon classified it, so
// errors.Is(err, ErrNotFound) works as for any other call.
func (c *Client) PullImage(ctx context.Context, req PullRequest, progress func(Pull)) (Image, error) {
	p, err := c.StartPull(ctx, req)
	for err == nil {
		if progress != nil {
			progress(p)
		}
		switch p.State {
		case PullSucceeded:
			if p.Image == nil {
				return Image{}, fmt.Errorf("pull %s: the daemon reported success without an image", req.Ref)
			}
			return *p.Image, nil
		case PullFailed:
			if p.Error == nil {
				return Image{}, fmt.Errorf("pull %s failed", req.Ref)
			}
			return Image{}, errorFromDoc(*p.Error)
		}
		select {
		case <-ctx.Done():
			return Image{}, fmt.Errorf("pull %s: %w (the pull goes on in the daemon)", req.Ref, ctx.Err())
		case <-time.After(PullPollInterval):
		}
		p, err = c.GetPull(ctx, p.ID)
	}
	return Image{}, err
}
