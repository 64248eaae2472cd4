package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Image is one row of the images table: a built root filesystem, keyed by
// the digest of the platform manifest it was built from.
type Image struct {
	Digest       string
	SizeBytes    int64  // apparent size of its ext4 image
	DiskBytes    int64  // bytes that image allocates on the host
	ContentBytes int64  // bytes of the files in it
	Platform     string // os/arch[/variant]
	Config       string // JSON: entrypoint, cmd, env, working_dir, user
	Layers       int
	CreatedAt    time.Time
	Refs         []string // references (tags) that point at it; filled by reads
}

// ErrInUse is returned when deleting an image an instance or snapshot uses.
var ErrInUse = errors.New("in use")

const imageCols = `digest, size_bytes, disk_bytes, content_bytes, platform, config, layers, created_at`

func scanImage(row interface{ Scan(...any) error }) (Image, error) {
	var im Image
	var created int64
	err := row.Scan(&im.Digest, &im.SizeBytes, &im.DiskBytes, &im.ContentBytes, &im.Platform, &im.Config, &im.Layers, &created)
	im.CreatedAt = time.Unix(0, created).UTC()
	return im, err
}

// CreateImage inserts an image and points refs at it, in one transaction.
// An image already recorded is kept (only the refs move): two builds of one
// digest are the same bytes.
func (s *Store) CreateImage(ctx context.Context, im Image, refs ...string) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("create image %s: %w", im.Digest, err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `INSERT INTO images (`+imageCols+`) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(digest) DO NOTHING`,
		im.Digest, im.SizeBytes, im.DiskBytes, im.ContentBytes, im.Platform, im.Config, im.Layers, im.CreatedAt.UnixNano()); err != nil {
		return fmt.Errorf("create image %s: %w", im.Digest, err)
	}
	if err := setRefs(ctx, tx, im.Digest, refs); err != nil {
		return err
	}
	return tx.Commit()
}

// SetImageRefs points refs at an existing image (moving them from any other).
func (s *Store) SetImageRefs(ctx context.Context, digest string, refs ...string) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("tag image %s: %w", digest, err)
	}
	defer tx.Rollback()
	if err := setRefs(ctx, tx, digest, refs); err != nil {
		return err
	}
	return tx.Commit()
}

func setRefs(ctx context.Context, tx *sql.Tx, digest string, refs []string) error {
	now := time.Now().UnixNano()
	for _, r := range refs {
		if r == "" {
			continue
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO image_refs (ref, digest, updated_at) VALUES (?,?,?)
			ON CONFLICT(ref) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at`, r, digest, now)
		if err != nil {
			if strings.Contains(err.Error(), "FOREIGN KEY") {
				return fmt.Errorf("tag image %s as %s: %w", digest, r, ErrNotFound)
			}
			return fmt.Errorf("tag image %s as %s: %w", digest, r, err)
		}
	}
	return nil
}

// GetImage returns the image with exactly this digest, with its refs.
func (s *Store) GetImage(ctx context.Context, digest string) (Image, error) {
	im, err := scanImage(s.db.QueryRowContext(ctx, `SELECT `+imageCols+` FROM images WHERE digest = ?`, digest))
	if errors.Is(err, sql.ErrNoRows) {
		return Image{}, fmt.Errorf("image %s: %w", digest, ErrNotFound)
	}
	if err != nil {
		return Image{}, fmt.Errorf("get image %s: %w", digest, err)
	}
	refs, err := s.refsOf(ctx, digest)
	im.Refs = refs[digest]
	return im, err
}

// ImageByRef returns the digest a reference points at.
func (s *Store) ImageByRef(ctx context.Context, ref string) (string, error) {
	var d string
	err := s.db.QueryRowContext(ctx, `SELECT digest FROM image_refs WHERE ref = ?`, ref).Scan(&d)
	if errors.Is(err, sql.ErrNoRows) {
		return "", fmt.Errorf("image %s: %w", ref, ErrNotFound)
	}
	if err != nil {
		return "", fmt.Errorf("image %s: %w", ref, err)
	}
	return d, nil
}

// ImageDigestsWithPrefix returns the digests starting with prefix (at most
// two: enough to tell a unique prefix from an ambiguous one).
func (s *Store) ImageDigestsWithPrefix(ctx context.Context, prefix string) ([]string, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT digest FROM images WHERE substr(digest, 1, ?) = ? ORDER BY digest LIMIT 2`, len(prefix), prefix)
	if err != nil {
		return nil, fmt.Errorf("find image %s: %w", prefix, err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var d string
		if err := rows.Scan(&d); err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

// ListImages returns every image with its refs, oldest first.
func (s *Store) ListImages(ctx context.Context) ([]Image, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+imageCols+` FROM images ORDER BY created_at, digest`)
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	var out []Image
	for rows.Next() {
		im, err := scanImage(rows)
		if err != nil {
			rows.Close()
			return nil, fmt.Errorf("list images: %w", err)
		}
		out = append(out, im)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	refs, err := s.refsOf(ctx, "")
	for i := range out {
		out[i].Refs = refs[out[i].Digest]
	}
	return out, err
}

// refsOf maps digests to their refs (sorted): of one digest, or all ("").
func (s *Store) refsOf(ctx context.Context, digest string) (map[string][]string, error) {
	q, args := `SELECT digest, ref FROM image_refs ORDER BY ref`, []any{}
	if digest != "" {
		q, args = `SELECT digest, ref FROM image_refs WHERE digest = ? ORDER BY ref`, []any{digest}
	}
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("image refs: %w", err)
	}
	defer rows.Close()
	out := map[string][]string{}
	for rows.Next() {
		var d, r string
		if err := rows.Scan(&d, &r); err != nil {
			return nil, err
		}
		out[d] = append(out[d], r)
	}
	return out, rows.Err()
}

// ImageUsers names the instances and snapshots whose disk came from the
// image ("instance web", "snapshot base"), at most limit of them.
func (s *Store) ImageUsers(ctx context.Context, digest string, limit int) ([]string, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT 'instance ' || name FROM instances WHERE image = ?
		UNION ALL SELECT 'snapshot ' || name FROM snapshots WHERE image = ? LIMIT ?`, digest, digest, limit)
	if err != nil {
		return nil, fmt.Errorf("users of image %s: %w", digest, err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, rows.Err()
}

// DeleteImage removes an image and its refs, unless an instance or
// snapshot uses it (ErrInUse: the check and the delete are one
// transaction). A missing image is ErrNotFound.
func (s *Store) DeleteImage(ctx context.Context, digest string) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("delete image %s: %w", digest, err)
	}
	defer tx.Rollback()
	var users int
	if err := tx.QueryRowContext(ctx, `SELECT (SELECT COUNT(*) FROM instances WHERE image = ?) +
		(SELECT COUNT(*) FROM snapshots WHERE image = ?)`, digest, digest).Scan(&users); err != nil {
		return fmt.Errorf("delete image %s: %w", digest, err)
	}
	if users > 0 {
		return fmt.Errorf("delete image %s: %d instances and snapshots use it: %w", digest, users, ErrInUse)
	}
	res, err := tx.ExecContext(ctx, `DELETE FROM images WHERE digest = ?`, digest)
	if err != nil {
		return fmt.Errorf("delete image %s: %w", digest, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("delete image %s: %w", digest, ErrNotFound)
	}
	return tx.Commit()
}
