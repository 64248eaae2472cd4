package cli

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/network"
)

func newRunCommand() *cobra.Command {
	var req api.CreateInstanceRequest
	var noStart, withNet, noNet bool
	var publish []string
	var diskSize string
	cmd := &cobra.Command{
		Use:   "run [NAME]",
		Short: "Create an instance and boot it",
		Example: `  forkd run web --memory 512 --kernel /srv/vmlinux --rootfs /srv/rootfs.ext4
  forkd run web --net --publish 8080:80     # reach it at its address, and at host port 8080
  forkd run web --image alpine:3.20 --disk-size 4GiB
  forkd run web --huge-pages 2M             # guest memory of 2 MiB pages (needs vm.nr_hugepages)
  forkd run --no-start`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := NewClient(cmd)
			if err != nil {
				return err
			}
			req.Name = "vm-" + randomSuffix()
			if len(args) == 1 {
				req.Name = args[0]
			}
			if noStart {
				f := false
				req.Start = &f
			}
			if withNet && noNet {
				return fmt.Errorf("--net and --no-net: pick one")
			}
			if withNet || noNet {
				on := withNet
				req.Network = &api.NetworkRequest{Enabled: &on}
			}
			if req.Publish, err = parsePublishes(publish); err != nil {
				return err
			}
			if diskSize != "" {
				n, err := api.ParseBytes(diskSize)
				if err != nil || n <= 0 || n%(1<<20) != 0 {
					return fmt.Errorf("--disk-size %q: want a whole number of MiB, e.g. 4GiB or 2048MiB", diskSize)
				}
				req.DiskSizeMiB = int(n >> 20)
			}
			if req.Image != "" {
				// Pull first, with progress; the create then names the digest.
				d, err := pullForRun(cmd.Context(), cmd, c, req.Image)
				if err != nil {
					return err
				}
				req.Image = d
			}
			start := time.Now()
			inst, err := c.CreateInstance(cmd.Context(), req)
			if errors.Is(err, api.ErrPoolExhausted) {
				return withHint(err, api.ErrPoolExhausted, "every address of the daemon's network_cidr is taken: delete a networked VM, widen network_cidr, or run with --no-net")
			}
			if err != nil {
				return withHint(err, api.ErrExists, "instance %q exists: pick another name or `forkd rm %s` first", req.Name, req.Name)
			}
			return printResult(cmd, inst, fmt.Sprintf("created %s (%s): %s in %s", inst.Name, shortID(inst.ID), inst.State, ms(time.Since(start))))
		},
	}
	f := cmd.Flags()
	f.IntVar(&req.Vcpus, "vcpus", api.DefaultVcpus, "virtual CPUs")
	f.IntVarP(&req.MemoryMiB, "memory", "m", api.DefaultMemoryMiB, "guest memory in MiB")
	f.StringVar(&req.Kernel, "kernel", "", "kernel image path on the host (default: the daemon's)")
	f.StringVar(&req.Rootfs, "rootfs", "", "root filesystem image path on the host")
	f.StringVar(&req.Image, "image", "", "container image whose root filesystem the VM's disk clones (pulled first if missing): a registry reference, oci:PATH[:TAG] or docker-archive:PATH")
	f.StringVar(&diskSize, "disk-size", "", "grow the image's disk to this size, e.g. 4GiB (default: the image's size)")
	f.StringVar(&req.HugePages, "huge-pages", api.HugePagesNone, "back guest memory with 2 MiB pages from the host's pool (2M; restores then use the uffd backend), or not (none)")
	cmd.MarkFlagsMutuallyExclusive("image", "rootfs")
	f.StringVar(&req.BootArgs, "boot-args", "", "kernel command line (the emulator reads forkd.ws_mib=N forkd.write_pct=P ...)")
	f.BoolVar(&noStart, "no-start", false, "create only: leave it Created")
	f.BoolVar(&withNet, "net", false, "give the VM a network: its own address (default: the daemon's network_default)")
	f.BoolVar(&noNet, "no-net", false, "no network")
	f.StringArrayVarP(&publish, "publish", "p", nil, "publish a port, as [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp] (repeatable; needs a network)")
	return cmd
}

// parsePublishes reads --publish values (Docker's syntax).
func parsePublishes(specs []string) ([]api.PortPublish, error) {
	var out []api.PortPublish
	for _, s := range specs {
		p, err := network.ParsePublish(s)
		if err != nil {
			return nil, err
		}
		pp := api.PortPublish{HostPort: int(p.HostPort), GuestPort: int(p.GuestPort), Protocol: p.Protocol}
		if p.HostIP.IsValid() {
			pp.HostIP = p.HostIP.String()
		}
		out = append(out, pp)
	}
	return out, nil
}

func newPsCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "ps",
		Aliases: []string{"ls"},
		Short:   "List instances",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runList(cmd, (*api.Client).ListInstances, printInstances)
		},
	}
}

func newInspectCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "inspect REF...",
		Short: "Show instances (or snapshots) as JSON",
		Long:  "Show instances as JSON. A reference that names no instance is looked up among snapshots.",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := NewClient(cmd)
			if err != nil {
				return err
			}
			var out []any
			for _, ref := range args {
				inst, err := c.GetInstance(cmd.Context(), ref)
				if errors.Is(err, api.ErrNotFound) {
					snap, serr := c.GetSnapshot(cmd.Context(), ref)
					if serr == nil {
						out = append(out, snap)
						continue
					}
					return withHint(err, api.ErrNotFound, "no instance or snapshot %q: see `forkd ps` and `forkd snapshot ls`", ref)
				}
				if err != nil {
					return err
				}
				out = append(out, inst)
			}
			return printOneOrMany(cmd, out)
		},
	}
}

func newRmCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "rm REF...",
		Short: "Delete instances in any state (forks of them are unaffected)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return removeEach(cmd, "", args, (*api.Client).DeleteInstance)
		},
	}
}

// actionCommands are start, pause, resume, standby, restore and stop.
func actionCommands() []*cobra.Command {
	short := map[string]string{
		"start":   "Boot Created or Stopped instances",
		"pause":   "Pause Running instances",
		"resume":  "Resume Paused instances",
		"standby": "Park Running or Paused instances to disk (the VMM exits; memory is on disk)",
		"restore": "Wake Standby instances",
		"stop":    "Stop Running, Paused or Standby instances",
	}
	next := map[string]string{
		"start":   "only Created or Stopped instances start",
		"pause":   "only Running instances pause",
		"resume":  "only Paused instances resume",
		"standby": "only Running or Paused instances go to standby",
		"restore": "only Standby instances restore; a Stopped one needs `forkd start`",
		"stop":    "only Running, Paused or Standby instances stop",
	}
	var cmds []*cobra.Command
	for _, action := range api.Actions() {
		var backend string
		cmd := &cobra.Command{
			Use:   action + " REF...",
			Short: short[action],
			Args:  cobra.MinimumNArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, asJSON, err := clientFor(cmd)
				if err != nil {
					return err
				}
				var errs []error
				var done []api.Instance
				for _, ref := range args {
					start := time.Now()
					inst, err := c.Action(cmd.Context(), ref, action, api.ActionRequest{RestoreBackend: backend})
					if err != nil {
						err = withHint(err, api.ErrInvalidState, "%s; see the state with `forkd ps`", next[action])
						errs = append(errs, fmt.Errorf("%s %s: %w", action, ref, err))
						continue
					}
					done = append(done, inst)
					if !asJSON {
						extra := ""
						if action == "restore" {
							extra = " (" + inst.RestoreBackend + " backend)"
						}
						fmt.Fprintf(stdout(cmd), "%s: %s in %s%s\n", inst.Name, inst.State, ms(time.Since(start)), extra)
					}
				}
				if asJSON {
					if err := printJSON(stdout(cmd), done); err != nil {
						return err
					}
				}
				return errors.Join(errs...)
			},
		}
		if action == "restore" {
			cmd.Flags().StringVar(&backend, "restore-backend", "", "file or uffd (default: the daemon's restore_backend)")
		}
		cmds = append(cmds, cmd)
	}
	return cmds
}

// printResult prints v as JSON with -o json, else the line.
func printResult(cmd *cobra.Command, v any, line string) error {
	asJSON, err := jsonOutput(cmd)
	if err != nil {
		return err
	}
	if asJSON {
		return printJSON(stdout(cmd), v)
	}
	_, err = fmt.Fprintln(stdout(cmd), line)
	return err
}

// randomSuffix is 6 hex digits for generated names.
func randomSuffix() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// forkBaseName derives a name for forks of a source named src.
func forkBaseName(src string) string {
	suffix := "-fork-" + randomSuffix()
	if len(src)+len(suffix) > 63-4 { // room for "-NNN" with --count
		src = strings.TrimRight(src[:63-4-len(suffix)], "-")
	}
	return src + suffix
}
