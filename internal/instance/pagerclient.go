package instance

import (
	"context"
	"fmt"

	"github.com/forkd/forkd/internal/api"
)

// startPager starts (or finds) the host pager of this forkd's version.
// TODO(pager): wire internal/pager.EnsureRunning once it lands.
func (m *Manager) startPager(ctx context.Context) (Pager, error) {
	return nil, fmt.Errorf("%w: the userfaultfd pager is not available in this build", api.ErrUnavailable)
}
