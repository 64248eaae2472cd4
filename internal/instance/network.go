package instance

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/network"
	"github.com/forkd/forkd/internal/store"
)

// This file is the manager's side of networking: when each VM's network
// is made and removed, and what is recorded. How is internal/network's.
//
// A networked instance holds a slot of the address pool (store net_slot,
// allocated with its record, in the same transaction) from create or fork
// until delete; standby, stop and restore keep it, so its address is
// stable for its life. Its namespace is made right after the record
// (journal step "network"), before any file or VMM, and removed by delete
// after the VMM is dead and before the record goes. The reconciler removes
// every namespace and host link of this data dir's tag that no record
// holds, and makes again (Ensure) those a record holds but the host lacks
// (a crash mid-setup, a host reboot).

// netState guards the host table: made once, before the first networked
// VM of this daemon's life (network.Host.Init), not at all while no VM is
// networked.
type netState struct {
	mu    sync.Mutex
	ready bool // guarded by mu
}

// net is the network Host, nil when networking is off on this daemon.
func (m *Manager) net() *network.Host { return m.cfg.Network }

// netReady makes the host table (with every recorded publish) once.
func (m *Manager) netReady(ctx context.Context) error {
	m.netState.mu.Lock()
	defer m.netState.mu.Unlock()
	if m.netState.ready {
		return nil
	}
	all, err := m.db.ListInstances(ctx)
	if err != nil {
		return err
	}
	pubs, err := m.db.Publishes(ctx)
	if err != nil {
		return err
	}
	var sp []network.SlotPublishes
	for _, in := range all {
		if in.Networked && len(pubs[in.ID]) > 0 {
			sp = append(sp, network.SlotPublishes{Slot: in.NetSlot, Publish: toNetPublishes(pubs[in.ID])})
		}
	}
	if err := m.net().Init(sp); err != nil {
		return err
	}
	m.netState.ready = true
	return nil
}

// wantNetwork decides whether a new instance is networked and checks its
// publishes: the request's choice, else network_default.
func (m *Manager) wantNetwork(req *api.NetworkRequest, pubs []api.PortPublish) (bool, []store.Publish, error) {
	on := m.cfg.NetworkDefault
	if req != nil && req.Enabled != nil {
		on = *req.Enabled
	}
	if !on {
		if len(pubs) > 0 {
			return false, nil, fmt.Errorf("%w: publish needs a network: enable it (network.enabled, forkd run --net)", api.ErrInvalid)
		}
		return false, nil, nil
	}
	if m.net() == nil {
		return false, nil, fmt.Errorf("%w: networking is off on this daemon (%s); create without a network", api.ErrInvalid, m.cfg.NetworkOffReason)
	}
	out, err := m.checkPublishes(pubs)
	return true, out, err
}

// checkPublishes normalises publishes and refuses a host port something on
// the host already holds (api.ErrPortInUse).
func (m *Manager) checkPublishes(pubs []api.PortPublish) ([]store.Publish, error) {
	if len(pubs) == 0 {
		return nil, nil
	}
	var out []store.Publish
	var np []network.Publish
	for _, p := range pubs {
		sp := store.Publish{HostIP: p.HostIP, HostPort: p.HostPort, GuestPort: p.GuestPort, Protocol: p.Protocol}
		if sp.Protocol == "" {
			sp.Protocol = "tcp"
		}
		if sp.HostIP == "0.0.0.0" {
			sp.HostIP = ""
		}
		out = append(out, sp)
		np = append(np, toNetPublishes([]store.Publish{sp})...)
	}
	if err := m.net().CheckPorts(np); err != nil {
		if errors.Is(err, network.ErrPortInUse) {
			return nil, fmt.Errorf("%w: %v", api.ErrPortInUse, err)
		}
		return nil, fmt.Errorf("%w: %v", api.ErrInvalid, err)
	}
	return out, nil
}

func toNetPublishes(ps []store.Publish) []network.Publish {
	var out []network.Publish
	for _, p := range ps {
		np := network.Publish{HostPort: uint16(p.HostPort), GuestPort: uint16(p.GuestPort), Protocol: p.Protocol}
		if p.HostIP != "" {
			np.HostIP, _ = netip.ParseAddr(p.HostIP)
		}
		out = append(out, np)
	}
	return out
}

// createRecord inserts a new instance's record; a networked one gets its
// pool slot and publishes in the same transaction.
func (m *Manager) createRecord(ctx context.Context, rec *store.Instance, pubs []store.Publish) error {
	if !rec.Networked {
		return apiErr(m.db.CreateInstance(ctx, *rec))
	}
	return networkRecordErr(m.net(), m.db.CreateNetworkedInstance(ctx, rec, m.net().Config().Slots(), pubs))
}

// networkRecordErr is the API's error for a record that could not be
// written: a full pool or a taken port say what to do.
func networkRecordErr(h *network.Host, err error) error {
	switch {
	case errors.Is(err, store.ErrPoolExhausted):
		return fmt.Errorf("%w: network_cidr %s: every address is in use; delete a networked VM or widen network_cidr (%v)",
			api.ErrPoolExhausted, h.Config().Pool, err)
	case errors.Is(err, store.ErrPortTaken):
		return fmt.Errorf("%w: %v", api.ErrPortInUse, err)
	}
	return apiErr(err)
}

// setupNetwork makes a new networked instance's network (and its
// publishes) and journals step "network".
func (m *Manager) setupNetwork(ctx context.Context, o *op, rec store.Instance, pubs []store.Publish) error {
	if !rec.Networked {
		return nil
	}
	if err := m.netReady(ctx); err != nil {
		return err
	}
	if !rec.NetWarm { // a warm slot's network was made (and recorded) ahead
		if err := m.net().Ensure(rec.NetSlot); err != nil {
			return err
		}
	}
	// Publishes after the network: they set a sysctl on its host link.
	if len(pubs) > 0 {
		if err := m.net().AddPublishes(rec.NetSlot, toNetPublishes(pubs)); err != nil {
			return err
		}
	}
	if rec.NetWarm {
		return nil // nothing was made here: nothing new to journal
	}
	return o.step(ctx, "network", nil)
}

// removeNetwork removes an instance's network and publishes (idempotent).
func (m *Manager) removeNetwork(in store.Instance) error {
	if !in.Networked || m.net() == nil {
		return nil
	}
	err := m.net().RemovePublishes(in.NetSlot)
	if rerr := m.net().Remove(in.NetSlot); rerr != nil {
		err = errors.Join(err, rerr)
	}
	return err
}

// netNS is the namespace an instance's VMM runs in ("" if none).
func (m *Manager) netNS(in store.Instance) string {
	if !in.Networked || m.net() == nil {
		return ""
	}
	return m.net().Config().NamespacePath(in.NetSlot)
}

// prepareTAP and activateTAP bracket a VMM's attach to its TAP (see
// network.Host.PrepareTAP).
func (m *Manager) prepareTAP(in store.Instance) error {
	if m.netNS(in) == "" {
		return nil
	}
	return m.net().PrepareTAP(in.NetSlot)
}

func (m *Manager) activateTAP(in store.Instance) error {
	if m.netNS(in) == "" || m.cfg.DisableTAPActivation { // the switch: a twin test only
		return nil
	}
	return m.net().ActivateTAP(in.NetSlot)
}

// guestIdentity is a networked instance's guest side: what it booted with.
func guestIdentity(in store.Instance) (network.Config, error) {
	var c network.Config
	var err error
	if c.Guest, err = netip.ParsePrefix(in.NetGuest); err != nil {
		return c, fmt.Errorf("instance %s: guest network %q: %w", in.ID, in.NetGuest, err)
	}
	if c.GuestMAC, err = net.ParseMAC(in.NetMAC); err != nil {
		return c, fmt.Errorf("instance %s: guest MAC %q: %w", in.ID, in.NetMAC, err)
	}
	return c, nil
}

// netInterface is the guest NIC a networked instance boots with.
func netInterface(in store.Instance) firecracker.NetworkInterface {
	return firecracker.NetworkInterface{IfaceID: "eth0", HostDevName: network.TapName, GuestMAC: in.NetMAC}
}

// withBootIP appends the guest's ip= to boot args unless they hold one.
func withBootIP(args, ip string) string {
	for _, w := range strings.Fields(args) {
		if strings.HasPrefix(w, "ip=") {
			return args
		}
	}
	if args == "" {
		return ip
	}
	return args + " " + ip
}

// networkAPI is an instance's "network" and "publish" in API form.
func (m *Manager) networkAPI(in store.Instance, pubs []store.Publish) (api.InstanceNetwork, []api.PortPublish) {
	if !in.Networked {
		return api.InstanceNetwork{}, nil
	}
	n := api.InstanceNetwork{Enabled: true, GuestMAC: in.NetMAC}
	if g, err := guestIdentity(in); err == nil {
		n.GuestAddress = g.GuestAddr().String()
	}
	if h := m.net(); h != nil {
		n.Address = h.Config().Address(in.NetSlot).String()
		n.Namespace = h.Config().Namespace(in.NetSlot)
	}
	var out []api.PortPublish
	for _, p := range pubs {
		out = append(out, api.PortPublish{HostIP: p.HostIP, HostPort: p.HostPort, GuestPort: p.GuestPort, Protocol: p.Protocol})
	}
	return n, out
}

// reconcileNetwork runs after the instances are settled: it removes every
// namespace and host link of this daemon's tag that no record holds,
// remakes those a record holds but the host lacks (also after a reboot;
// a running VMM's TAP is repaired in place, never replaced) and rebuilds
// the host table from the records (dropping any rule no record names), or
// removes it when no VM is networked.
func (m *Manager) reconcileNetwork(ctx context.Context) error {
	h := m.net()
	if h == nil {
		return nil
	}
	all, err := m.db.ListInstances(ctx)
	if err != nil {
		return err
	}
	need := map[int]store.Instance{}
	for _, in := range all {
		if in.Networked {
			need[in.NetSlot] = in
		}
	}
	warm, err := m.db.WarmSlots(ctx)
	if err != nil {
		return err
	}
	var errs []error
	// Warm networks are kept while a VM is networked, up to NetworkWarm.
	keepWarm := map[int]bool{}
	for i, w := range warm {
		if len(need) > 0 && i < m.cfg.NetworkWarm {
			keepWarm[w.Slot] = true
			continue
		}
		m.log.Info("reconcile: dropping a warm network", "namespace", h.Config().Namespace(w.Slot))
		errs = append(errs, h.Remove(w.Slot), m.db.DeleteWarmSlot(ctx, w.Slot))
	}
	present, err := h.Present()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for s := range present {
		if _, ok := need[s]; !ok && !keepWarm[s] {
			m.log.Info("reconcile: removing a network no record holds", "namespace", h.Config().Namespace(s))
			errs = append(errs, h.Remove(s))
		}
	}
	if len(need) == 0 {
		errs = append(errs, h.RemoveHostTable())
		return errors.Join(errs...)
	}
	m.netState.mu.Lock()
	m.netState.ready = false // rebuild from the records
	m.netState.mu.Unlock()
	if err := m.netReady(ctx); err != nil {
		return errors.Join(append(errs, err)...)
	}
	for s, in := range need {
		if h.Complete(s) {
			continue
		}
		m.log.Warn("reconcile: making a recorded network again", "instance", in.ID, "namespace", h.Config().Namespace(s))
		if err := h.Ensure(s); err != nil {
			errs = append(errs, err)
			continue
		}
		if p := m.proc(in.ID); p != nil && p.Alive() {
			errs = append(errs, h.ActivateTAP(s))
		}
	}
	// A warm network a crash left half made (or a reboot removed) is made
	// whole before it can be handed out; one that cannot be is dropped.
	for _, w := range warm {
		if !keepWarm[w.Slot] || (w.Ready && h.Complete(w.Slot)) {
			continue
		}
		if err := h.Ensure(w.Slot); err != nil {
			m.log.Warn("reconcile: dropping a warm network that cannot be made", "namespace", h.Config().Namespace(w.Slot), "err", err)
			errs = append(errs, h.Remove(w.Slot), m.db.DeleteWarmSlot(ctx, w.Slot))
			continue
		}
		errs = append(errs, m.db.SetWarmReady(ctx, w.Slot))
	}
	return errors.Join(errs...)
}
