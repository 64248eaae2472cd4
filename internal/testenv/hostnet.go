package testenv

import (
	"fmt"
	"os"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Tests never give a VM a network in the namespace the test binary started
// in (the host's own): every networked daemon a test runs lives in a
// namespace the test made (internal/network/nettest). Main checks it for
// a whole test binary, because a daemon that broke that rule once filled
// the host with hundreds of VM veths and routes that no test noticed.

// vmHostLink matches the host end of a VM's veth, as internal/network
// names it (network.Config.HostVeth, whose test checks this agrees): "fk",
// the data dir's 6-hex-digit tag, "-", the slot in hex.
var vmHostLink = regexp.MustCompile(`^fk[0-9a-f]{6}-[0-9a-f]{1,6}$`)

// IsVMHostLink reports whether name is named like the host end of a VM's
// veth.
func IsVMHostLink(name string) bool { return vmHostLink.MatchString(name) }

// A NetWatch records the VM host links that appear in one network
// namespace while it runs, whether or not they are gone again by the end.
type NetWatch struct {
	ns     netns.NsHandle
	before map[string]bool
	done   chan struct{}
	ended  chan struct{} // closed when the event reader has returned

	mu      sync.Mutex
	seen    map[string]bool // guarded by mu: VM host links that appeared
	lost    error           // guarded by mu: the event stream broke (links may have come and gone unseen)
	stopped bool            // guarded by mu
}

// WatchNetwork starts watching the network namespace at nsPath, or with
// nsPath "" the calling thread's (in a TestMain, the namespace the test
// binary started in: the host's own).
func WatchNetwork(nsPath string) (*NetWatch, error) {
	var ns netns.NsHandle
	var err error
	if nsPath == "" {
		runtime.LockOSThread()
		ns, err = netns.Get()
		runtime.UnlockOSThread()
	} else {
		ns, err = netns.GetFromPath(nsPath)
	}
	if err != nil {
		return nil, fmt.Errorf("testenv: watch network namespace %q: %w", nsPath, err)
	}
	w := &NetWatch{ns: ns, done: make(chan struct{}), ended: make(chan struct{}), seen: map[string]bool{}}
	if w.before, err = w.links(); err != nil {
		ns.Close()
		return nil, err
	}
	ch := make(chan netlink.LinkUpdate, 256)
	err = netlink.LinkSubscribeWithOptions(ch, w.done, netlink.LinkSubscribeOptions{
		Namespace:         &w.ns,
		ReceiveBufferSize: 4 << 20,
		ErrorCallback: func(err error) {
			w.mu.Lock()
			if !w.stopped && w.lost == nil {
				w.lost = err
			}
			w.mu.Unlock()
		},
	})
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("testenv: watch links in %q: %w", nsPath, err)
	}
	go func() {
		defer close(w.ended)
		for u := range ch {
			if u.Header.Type != unix.RTM_NEWLINK || u.Link == nil {
				continue
			}
			if name := u.Link.Attrs().Name; vmHostLink.MatchString(name) && !w.before[name] {
				w.mu.Lock()
				w.seen[name] = true
				w.mu.Unlock()
			}
		}
	}()
	return w, nil
}

// links lists the VM host links in the watched namespace now.
func (w *NetWatch) links() (map[string]bool, error) {
	h, err := netlink.NewHandleAt(w.ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("testenv: netlink: %w", err)
	}
	defer h.Close()
	ls, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("testenv: list links: %w", err)
	}
	out := map[string]bool{}
	for _, l := range ls {
		if name := l.Attrs().Name; vmHostLink.MatchString(name) {
			out[name] = true
		}
	}
	return out, nil
}

// Stop ends the watch and returns, sorted, every VM host link that was not
// there when it began and appeared since: seen coming, or there now. The
// error says the event stream broke (the links present now are still
// checked).
func (w *NetWatch) Stop() ([]string, error) {
	now, err := w.links()
	w.mu.Lock()
	w.stopped = true
	w.mu.Unlock()
	close(w.done)
	<-w.ended
	defer w.ns.Close()
	if err != nil {
		return nil, err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for name := range now {
		if !w.before[name] {
			w.seen[name] = true
		}
	}
	out := make([]string, 0, len(w.seen))
	for name := range w.seen {
		out = append(out, name)
	}
	sort.Strings(out)
	return out, w.lost
}

// Main runs a test binary's tests and returns its exit code (TestMain:
// os.Exit(testenv.Main(m))). It removes the shared forkd build, and it
// fails the run, naming them, when VM host links appeared in the namespace
// the binary started in while the tests ran (some test gave a VM a
// network on the host's own network instead of in a namespace of its
// own), or when forkd cgroups or network namespaces that appeared are
// still there at the end with nothing alive using them (HostWatch: some
// test tore a data dir down and left its jail cgroups or VM namespaces).
func Main(m *testing.M) int {
	w, werr := WatchNetwork("")
	hw, hwerr := watchHostObjects()
	code := m.Run()
	RemoveBuild()
	fail := func(report string) {
		fmt.Fprint(os.Stderr, report)
		if code == 0 {
			code = 1
		}
	}
	if hwerr != nil {
		fmt.Fprintf(os.Stderr, "testenv: cannot list forkd's cgroups and network namespaces (not checked): %v\n", hwerr)
	} else if left, err := hw.Leftovers(leftoverGrace()); err != nil {
		fmt.Fprintf(os.Stderr, "testenv: cannot list forkd's cgroups and network namespaces (not checked): %v\n", err)
	} else if len(left) > 0 {
		fail(HostLeftoverReport(left))
	}
	if werr != nil {
		fmt.Fprintf(os.Stderr, "testenv: cannot watch this namespace for VM links (not checked): %v\n", werr)
		return code
	}
	leaked, err := w.Stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "testenv: the link watch lost events (%v); only links present at the end were checked\n", err)
	}
	if len(leaked) > 0 {
		fail(HostLinkReport(leaked))
	}
	return code
}

// EnvLeftoverGrace overrides how long Main waits for something alive to
// claim a forkd host object that appeared during the run before calling it
// left behind (a Go duration; default DefaultLeftoverGrace). Only the
// check's own twin sets it, to fail fast.
const EnvLeftoverGrace = "FORKD_TEST_LEFTOVER_GRACE"

// DefaultLeftoverGrace is how long another test's daemon may be between
// two holds of its data dir (killed and not yet restarted) before Main
// takes its objects for this binary's leftovers.
const DefaultLeftoverGrace = 20 * time.Second

func leftoverGrace() time.Duration {
	if d, err := time.ParseDuration(os.Getenv(EnvLeftoverGrace)); err == nil {
		return d
	}
	return DefaultLeftoverGrace
}

// watchHostObjects is WatchHost over this host's roots.
func watchHostObjects() (*HostWatch, error) {
	roots, err := HostRoots()
	if err != nil {
		return nil, err
	}
	return WatchHost(roots)
}

// HostLinkReport is Main's failure message for leaked VM host links.
func HostLinkReport(leaked []string) string {
	tags := map[string]bool{}
	for _, l := range leaked {
		tags[strings.SplitN(strings.TrimPrefix(l, "fk"), "-", 2)[0]] = true
	}
	var b strings.Builder
	fmt.Fprintf(&b, "FAIL: %d VM network link(s) appeared in the host's own network namespace while these tests ran: %s\n",
		len(leaked), strings.Join(leaked, " "))
	fmt.Fprintf(&b, "  A daemon or network.Host gave VMs networks outside a namespace of the test's own (tags %s: their\n"+
		"  namespaces are /var/run/netns/forkd-<tag>-<slot>, their rules the nftables table forkd_<tag>).\n"+
		"  Run networked daemons with daemonproc.Spec.NetNS = nettest.Namespace(t) and a pool from 198.18.0.0/15.\n"+
		"  (A test run of another checkout on this machine at the same time would show here too.)\n",
		strings.Join(sortedKeys(tags), ", "))
	return b.String()
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
