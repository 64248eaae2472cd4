package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/forkd/forkd/internal/daemon"
	"github.com/forkd/forkd/internal/doctor"
	"github.com/forkd/forkd/internal/instance"
)

// newDoctorCommand is `forkd doctor`: the host preflight (internal/doctor).
// It reads the daemon's configuration the way `forkd serve` does, so it
// checks the data dir and the limits serve would use, and it needs no
// running daemon.
func newDoctorCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Check this host for what forkd needs, and say what it does without the rest",
		Long: `Check this host before running forkd: KVM, the firecracker binary (with its
version), the jail (the jailer vmm_jailer resolves to, root and the cgroup
controllers it needs), userfaultfd, the data dir (ownership and reflink support),
/dev/net/tun, nf_tables, the cgroup controllers (v1 or v2), free memory and
disk. Each check says what is there, what is missing, and what forkd does
without it. It takes serve's flags and configuration; it needs no daemon.

Exit status: 0 when forkd can run (even without some features), 1 when it
cannot (an unsafe data dir, no disk, a jail it cannot set up).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := daemon.LoadConfig(cmd.Flags(), os.LookupEnv)
			if err != nil {
				return err
			}
			// The VMM and its jailer as serve would resolve them.
			j := doctor.Jail{Setting: cfg.VMMJailer}
			if vmm, err := instance.ResolveVMM(cfg.VMMBinary, cfg.EmulatorFirecrackerVersion); err != nil {
				j.Err = err
			} else {
				j.Cmd, j.Err = instance.ResolveJailer(cfg.VMMJailer, vmm)
			}
			rs := doctor.Run(cmd.Context(), doctor.Options{DataDir: cfg.DataDir, Capacity: cfg.Capacity, Jail: j})
			out := cmd.OutOrStdout()
			switch o, _ := cmd.Flags().GetString("output"); o {
			case "json":
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				if err := enc.Encode(rs); err != nil {
					return err
				}
			case "table", "":
				if err := doctor.Render(out, rs); err != nil {
					return err
				}
			default:
				return fmt.Errorf("--output %q: want table or json", o)
			}
			if doctor.Failed(rs) {
				return errors.New("doctor: forkd cannot run on this host as configured (see the checks marked fail)")
			}
			return nil
		},
	}
	daemon.BindFlags(cmd.Flags())
	return cmd
}
