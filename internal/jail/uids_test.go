package jail

import (
	"errors"
	"fmt"
	"sync"
	"testing"
)

func TestParseUIDRange(t *testing.T) {
	if r, err := ParseUIDRange("900000-900009"); err != nil || r != (UIDRange{900000, 900009}) {
		t.Errorf("ParseUIDRange = %v, %v", r, err)
	}
	for _, bad := range []string{"", "5", "0-10", "10-5", "a-b", "1-4294967295", "-5-10"} {
		if _, err := ParseUIDRange(bad); err == nil {
			t.Errorf("ParseUIDRange(%q) accepted", bad)
		}
	}
}

func TestNoTwoOwnersShareAUID(t *testing.T) {
	u := NewUIDs(UIDRange{100, 163})
	var mu sync.Mutex
	seen := map[int]string{}
	var wg sync.WaitGroup
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func(owner string) {
			defer wg.Done()
			uid, err := u.Acquire(owner)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if other, ok := seen[uid]; ok {
				t.Errorf("uid %d given to %s and %s", uid, other, owner)
			}
			seen[uid] = owner
		}(fmt.Sprint("vm", i))
	}
	wg.Wait()
	if _, err := u.Acquire("one-too-many"); !errors.Is(err, ErrNoUID) {
		t.Errorf("65th owner of 64 uids: %v, want ErrNoUID", err)
	}
	if uid, err := u.Acquire("vm3"); err != nil || seen[uid] != "vm3" {
		t.Errorf("an owner asking again got %d, %v; want its own uid", uid, err)
	}
	u.Release("vm3")
	if _, err := u.Acquire("one-too-many"); err != nil {
		t.Errorf("after a release: %v", err)
	}
}

func TestReleasedUIDIsReusedLast(t *testing.T) {
	u := NewUIDs(UIDRange{10, 12})
	a, _ := u.Acquire("a")
	u.Release("a")
	b, _ := u.Acquire("b")
	if a == b {
		t.Errorf("the uid just released (%d) was handed out again at once", a)
	}
}

func TestClaimRefusesAConflict(t *testing.T) {
	u := NewUIDs(UIDRange{10, 19})
	if err := u.Claim("a", 15); err != nil {
		t.Fatal(err)
	}
	if err := u.Claim("b", 15); err == nil {
		t.Error("a uid claimed by two owners")
	}
	if err := u.Claim("c", 99); err == nil {
		t.Error("a uid outside the range claimed")
	}
	for i := 0; i < 9; i++ {
		if uid, err := u.Acquire(fmt.Sprint("n", i)); err != nil || uid == 15 {
			t.Fatalf("Acquire = %d, %v; the claimed uid must not be handed out", uid, err)
		}
	}
	if _, err := u.Acquire("full"); !errors.Is(err, ErrNoUID) {
		t.Errorf("full range: %v", err)
	}
}
