package network

import (
	"os"
	"runtime"
	"testing"

	"github.com/forkd/forkd/internal/testenv"
	"github.com/vishvananda/netns"
)

// TestDoRunsInTheNamespaceAndComesBack checks that fn sees the target
// namespace and that the thread is back in the original one afterwards.
func TestDoRunsInTheNamespaceAndComesBack(t *testing.T) {
	testenv.NeedRoot(t)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		testenv.Need(t, testenv.Netns, "cannot read this thread's network namespace: "+err.Error())
	}
	defer orig.Close()
	name := testenv.TestNamespaceName("do-" + randHex(t))
	ns, err := netns.NewNamed(name)
	if err != nil {
		testenv.Need(t, testenv.Netns, "cannot create a named network namespace: "+err.Error())
	}
	ns.Close()
	// NewNamed moved this thread into the new namespace: go back first.
	if err := netns.Set(orig); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.DeleteNamed(name) })

	var inside netns.NsHandle
	err = Do("/var/run/netns/"+name, func() error {
		var err error
		inside, err = netns.Get()
		return err
	})
	if err != nil {
		t.Fatalf("Do: %v", err)
	}
	defer inside.Close()
	if inside.Equal(orig) {
		t.Fatalf("fn ran in the original namespace %v, want %s", orig, name)
	}
	after, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer after.Close()
	if !after.Equal(orig) {
		t.Fatalf("after Do the thread is in %v, want the original %v", after, orig)
	}
}

func TestDoReportsAMissingNamespace(t *testing.T) {
	err := Do("/var/run/netns/forkd-no-such-namespace", func() error {
		t.Error("fn ran for a namespace that does not exist")
		return nil
	})
	if err == nil || !os.IsNotExist(unwrapAll(err)) {
		t.Fatalf("Do on a missing namespace: %v, want a not-exist error", err)
	}
}
