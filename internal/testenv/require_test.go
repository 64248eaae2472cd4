package testenv

import (
	"testing"
)

func TestRequiredReadsTheList(t *testing.T) {
	for _, tc := range []struct {
		env  string
		key  string
		want bool
	}{
		{"", Root, false},
		{"root,loop", Loop, true},
		{"root, uffd ", Uffd, true},
		{"root", Netns, false},
		{"all", Netns, true},
	} {
		t.Setenv(EnvRequire, tc.env)
		if got := Required(tc.key); got != tc.want {
			t.Errorf("FORKD_TEST_REQUIRE=%q: Required(%s) = %v, want %v", tc.env, tc.key, got, tc.want)
		}
	}
}

func TestRequiredPanicsOnAnUnknownKey(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("Required(\"nope\") did not panic; a typo would silently never require anything")
		}
	}()
	Required("nope")
}

// fakeTB records whether Need skipped or failed.
type fakeTB struct {
	testing.TB
	skipped, failed bool
}

func (f *fakeTB) Helper()               {}
func (f *fakeTB) Skipf(string, ...any)  { f.skipped = true }
func (f *fakeTB) Fatalf(string, ...any) { f.failed = true }

func TestNeedFailsOnlyWhenRequired(t *testing.T) {
	t.Setenv(EnvRequire, "")
	f := &fakeTB{}
	Need(f, Uffd, "no userfaultfd")
	if !f.skipped || f.failed {
		t.Errorf("not required: skipped=%v failed=%v, want a skip", f.skipped, f.failed)
	}
	t.Setenv(EnvRequire, "uffd")
	f = &fakeTB{}
	Need(f, Uffd, "no userfaultfd")
	if f.skipped || !f.failed {
		t.Errorf("required: skipped=%v failed=%v, want a failure", f.skipped, f.failed)
	}
	f = &fakeTB{}
	Need(f, Uffd, "")
	if f.skipped || f.failed {
		t.Errorf("present: skipped=%v failed=%v, want neither", f.skipped, f.failed)
	}
}
