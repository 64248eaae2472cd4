package jail

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/forkd/forkd/internal/firecracker"
	"github.com/forkd/forkd/internal/testenv"
)

// BenchmarkLaunch prices the jail on the path every restore takes: from
// nothing running to a VMM answering its API (firecracker.Launch), for
// forkd vmm unjailed ("none"), and through `forkd jailer` with the exec file
// hardlinked ("jailed-link") or copied as the real jailer does
// ("jailed-copy"), with the cgroups (v1 or v2 as the host offers) and
// rlimits the manager gives a VM. A jailed iteration also clears what the
// previous launch left in the jail (dev/, the exec and pid files), as a
// relaunch in the same guest dir must. The kill and the cgroup's removal
// happen at standby, not restore, and are not timed.
//
//	go test -run '^$' -bench Launch -benchtime 40x ./internal/jail
func BenchmarkLaunch(b *testing.B) {
	testenv.NeedRoot(b)
	m, err := ReadMounts(MountTable)
	if err == nil {
		_, err = m.Version(Controllers...)
	}
	if err != nil {
		testenv.Need(b, testenv.Cgroup, err.Error())
	}
	version, _ := m.Version(Controllers...)
	bin := testenv.ForkdBinary(b)
	for _, mode := range []string{"none", "jailed-link", "jailed-copy"} {
		b.Run(mode, func(b *testing.B) {
			dir, err := os.MkdirTemp("", "jb")
			if err != nil {
				b.Fatal(err)
			}
			defer os.RemoveAll(dir)
			exec := filepath.Join(dir, "bin", "forkd-vmm")
			os.MkdirAll(filepath.Dir(exec), 0o755)
			data, err := os.ReadFile(bin)
			if err != nil {
				b.Fatal(err)
			}
			if err := os.WriteFile(exec, data, 0o755); err != nil {
				b.Fatal(err)
			}
			tg := tag()
			a := Args{
				ID: "jb-" + tg, ExecFile: exec, UID: 64200, GID: 64200,
				ChrootBaseDir: filepath.Join(dir, "jail"), CgroupVersion: version,
				Cgroups:        Settings(version, Limits{VCPUs: 1, MemoryBytes: 512 << 20, Pids: 256}),
				ParentCgroup:   "forkd-bench-" + tg,
				ResourceLimits: []string{"no-file=2048"},
			}
			root := a.ChrootDir()
			cg, _ := m.Locate(version, a.ParentCgroup, a.ID, Controllers)
			defer func() {
				cg.Remove()
				for _, d := range cg.dirs() {
					os.Remove(filepath.Dir(d))
				}
			}()
			spec := firecracker.LaunchSpec{LogPath: filepath.Join(dir, "vmm.log")}
			switch mode {
			case "none":
				os.MkdirAll(root, 0o755)
				spec.Binary, spec.Args, spec.ID, spec.WorkDir = bin, []string{"vmm"}, a.ID, root
			case "jailed-copy":
				spec.Env = []string{EnvCopyExec + "=1"}
				fallthrough
			default:
				spec.Jailer = append([]string{bin, "jailer"}, a.CommandLine()...)
				spec.JailRoot = root
			}
			spec.APISock = filepath.Join(root, "vmm.sock")
			var samples []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				start := time.Now()
				if mode != "none" {
					for _, n := range []string{"dev", "run", "forkd-vmm", "forkd-vmm.pid"} {
						os.RemoveAll(filepath.Join(root, n))
					}
				}
				p, err := firecracker.Launch(context.Background(), spec)
				if err != nil {
					b.Fatal(err)
				}
				samples = append(samples, time.Since(start))
				b.StopTimer()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				if err := p.Kill(ctx); err != nil {
					b.Fatal(err)
				}
				cancel()
				cg.Remove()
				b.StartTimer()
			}
			sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
			b.ReportMetric(float64(samples[len(samples)/2].Microseconds())/1000, "p50-ms")
		})
	}
}
