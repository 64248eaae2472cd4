package jail

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
)

// ErrNoUID is returned when every uid of the range is held by a running
// VMM.
var ErrNoUID = errors.New("every uid of jail_uid_range is held by a running VMM")

// UIDRange is a closed range of uids (and the gids of the same numbers)
// for VMMs: the jail_uid_range setting, "FIRST-LAST".
type UIDRange struct{ First, Last int }

// maxUID keeps clear of (uid_t)-1 and (uid_t)-2, which mean "no change"
// and nobody in places.
const maxUID = 1<<32 - 3

// ParseUIDRange reads "FIRST-LAST". Root (0) is never a VMM's uid.
func ParseUIDRange(s string) (UIDRange, error) {
	a, b, ok := strings.Cut(s, "-")
	first, err1 := strconv.ParseUint(strings.TrimSpace(a), 10, 32)
	last, err2 := strconv.ParseUint(strings.TrimSpace(b), 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return UIDRange{}, fmt.Errorf("jail_uid_range %q: want FIRST-LAST, e.g. 900000-965535", s)
	}
	if first == 0 || first > last || last > maxUID {
		return UIDRange{}, fmt.Errorf("jail_uid_range %q: want 1 <= FIRST <= LAST <= %d", s, uint64(maxUID))
	}
	return UIDRange{First: int(first), Last: int(last)}, nil
}

func (r UIDRange) String() string { return fmt.Sprintf("%d-%d", r.First, r.Last) }

// Contains reports whether uid lies in r.
func (r UIDRange) Contains(uid int) bool { return uid >= r.First && uid <= r.Last }

// UIDs hands out one uid of a range per running VMM, so that no two VMMs
// ever share one: a VMM's files, its /dev/userfaultfd and its TAP belong to
// its uid alone. Safe for concurrent use.
type UIDs struct {
	r  UIDRange
	mu sync.Mutex
	// byOwner and byUID hold the same pairs: which VMM (an instance id)
	// holds which uid. Guarded by mu.
	byOwner map[string]int
	byUID   map[int]string
	next    int // where the next search starts (round robin); guarded by mu
}

// NewUIDs is an allocator with every uid of r free.
func NewUIDs(r UIDRange) *UIDs {
	return &UIDs{r: r, byOwner: map[string]int{}, byUID: map[int]string{}, next: r.First}
}

// Acquire gives owner a uid no other owner holds (the one it already holds,
// if any). Uids are handed out round robin, so one just released is the
// last to be reused.
func (u *UIDs) Acquire(owner string) (int, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if uid, ok := u.byOwner[owner]; ok {
		return uid, nil
	}
	size := u.r.Last - u.r.First + 1
	for i := 0; i < size; i++ {
		uid := u.r.First + (u.next-u.r.First+i)%size
		if _, taken := u.byUID[uid]; !taken {
			u.byOwner[owner], u.byUID[uid] = uid, owner
			u.next = uid + 1
			if u.next > u.r.Last {
				u.next = u.r.First
			}
			return uid, nil
		}
	}
	return 0, fmt.Errorf("%w (%s: %d uids)", ErrNoUID, u.r, size)
}

// Claim records that owner holds uid (a VMM found running at start). It
// fails for a uid outside the range or held by another owner.
func (u *UIDs) Claim(owner string, uid int) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if !u.r.Contains(uid) {
		return fmt.Errorf("uid %d of %s is outside jail_uid_range %s", uid, owner, u.r)
	}
	if other, ok := u.byUID[uid]; ok && other != owner {
		return fmt.Errorf("uid %d of %s is already held by %s", uid, owner, other)
	}
	if old, ok := u.byOwner[owner]; ok && old != uid {
		delete(u.byUID, old)
	}
	u.byOwner[owner], u.byUID[uid] = uid, owner
	return nil
}

// Release frees owner's uid, if it holds one.
func (u *UIDs) Release(owner string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if uid, ok := u.byOwner[owner]; ok {
		delete(u.byOwner, owner)
		delete(u.byUID, uid)
	}
}

// InUse is how many uids are held.
func (u *UIDs) InUse() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.byOwner)
}
