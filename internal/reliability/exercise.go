package reliability

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/forkd/forkd/internal/api"
)

// Exercise proves every instance and snapshot is operable and its memory
// intact: Standby instances restore; Running ones go through standby and
// restore again (the base survived); Paused ones resume; Created and Stopped
// ones start; every snapshot forks into a Running VM; every image boots a
// new VM from its root filesystem. Then each Running VM
// runs its self-checking workload for a moment and must report
// memory_check "ok". It returns how many operations it ran.
func Exercise(ctx context.Context, c *api.Client) (int, error) {
	insts, err := c.ListInstances(ctx)
	if err != nil {
		return 0, err
	}
	ops := 0
	var errs []error
	run := func(what string, f func() (api.Instance, error)) {
		ops++
		if in, err := f(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", what, err))
		} else if in.State != api.StateRunning {
			errs = append(errs, fmt.Errorf("%s: ended %s (error %q)", what, in.State, in.Error))
		}
	}
	for _, in := range insts {
		ref := in.ID
		switch in.State {
		case api.StateStandby:
			run("restore "+in.Name, func() (api.Instance, error) { return c.Action(ctx, ref, "restore", api.ActionRequest{}) })
		case api.StateRunning:
			ops++
			if _, err := c.Action(ctx, ref, "standby", api.ActionRequest{}); err != nil {
				errs = append(errs, fmt.Errorf("standby %s: %w", in.Name, err))
				continue
			}
			run("restore "+in.Name+" after standby", func() (api.Instance, error) { return c.Action(ctx, ref, "restore", api.ActionRequest{}) })
		case api.StatePaused:
			run("resume "+in.Name, func() (api.Instance, error) { return c.Action(ctx, ref, "resume", api.ActionRequest{}) })
		case api.StateCreated, api.StateStopped:
			run("start "+in.Name, func() (api.Instance, error) { return c.Action(ctx, ref, "start", api.ActionRequest{}) })
		default:
			errs = append(errs, fmt.Errorf("instance %s is %s: not operable", in.Name, in.State))
		}
	}
	snaps, err := c.ListSnapshots(ctx)
	if err != nil {
		return ops, err
	}
	for i, s := range snaps {
		ref := s.ID
		var nonce [4]byte
		rand.Read(nonce[:])
		name := fmt.Sprintf("x-%s-%d-%x", strings.ToLower(s.ID[:6]), i, nonce)
		run("fork snapshot "+s.Name, func() (api.Instance, error) {
			return c.ForkSnapshot(ctx, ref, api.ForkRequest{Name: name, TargetState: api.StateRunning})
		})
	}
	images, err := c.ListImages(ctx)
	if err != nil {
		return ops, err
	}
	for i, im := range images {
		digest := im.Digest
		var nonce [4]byte
		rand.Read(nonce[:])
		name := fmt.Sprintf("img-%s-%d-%x", digest[7:13], i, nonce)
		run("create from image "+digest[:19], func() (api.Instance, error) {
			return c.CreateInstance(ctx, api.CreateInstanceRequest{Name: name, Image: digest, MemoryMiB: 32,
				BootArgs: "forkd.ws_mib=4 forkd.rate=400 forkd.write_pct=30"})
		})
	}
	time.Sleep(300 * time.Millisecond) // let the workloads read (and verify) pages
	insts, err = c.ListInstances(ctx)
	if err != nil {
		return ops, err
	}
	sort.Slice(insts, func(i, j int) bool { return insts[i].Name < insts[j].Name })
	for _, in := range insts {
		if in.State == api.StateRunning && in.MemoryCheck != "ok" {
			errs = append(errs, fmt.Errorf("instance %s: memory_check %q after restore", in.Name, in.MemoryCheck))
		}
	}
	return ops, errors.Join(errs...)
}
