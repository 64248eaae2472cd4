package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/forkd/forkd/internal/api"
	"github.com/forkd/forkd/internal/guestdir"
	"github.com/forkd/forkd/internal/pager"
)

// DaemonSpec says how to start the benchmark's own daemon.
type DaemonSpec struct {
	Binary  string   // the forkd binary (`forkd serve`)
	DataDir string   // a data dir the benchmark owns: everything in it is deleted at Stop
	Args    []string // extra `forkd serve` flags, e.g. --vmm-binary PATH
	LogPath string   // the daemon's stderr; default DataDir/../daemon.log
}

// Daemon is a `forkd serve` child of the benchmark.
type Daemon struct {
	DataDir string
	Client  *api.Client
	LogPath string

	cmd    *exec.Cmd
	exited chan struct{} // closed when the daemon process was reaped
}

// StartDaemon starts `forkd serve --data-dir DIR` with a minimal environment
// (no FORKD_* variable of ours may configure it) and waits until its API
// answers GET /health.
func StartDaemon(ctx context.Context, spec DaemonSpec) (*Daemon, error) {
	if spec.LogPath == "" {
		spec.LogPath = filepath.Join(filepath.Dir(spec.DataDir), "daemon.log")
	}
	layout, err := guestdir.New(spec.DataDir)
	if err != nil {
		return nil, fmt.Errorf("start daemon: %w", err)
	}
	log, err := os.OpenFile(spec.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start daemon: open log: %w", err)
	}
	defer log.Close()
	args := append([]string{"serve", "--data-dir", layout.Root()}, spec.Args...)
	cmd := exec.Command(spec.Binary, args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start daemon %s: %w", spec.Binary, err)
	}
	d := &Daemon{DataDir: layout.Root(), LogPath: spec.LogPath, cmd: cmd, exited: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(d.exited) }()

	client, err := api.NewClient(layout.Socket())
	if err != nil {
		d.kill()
		return nil, fmt.Errorf("start daemon: %w", err)
	}
	d.Client = client
	if err := d.waitHealthy(ctx); err != nil {
		d.kill()
		return nil, fmt.Errorf("start daemon (log %s): %w%s", spec.LogPath, err, tail(spec.LogPath))
	}
	return d, nil
}

func (d *Daemon) waitHealthy(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_, err := d.Client.WaitHealthy(ctx, d.exited)
	if errors.Is(err, api.ErrDaemonExited) {
		return fmt.Errorf("daemon exited: %v", d.cmd.ProcessState)
	}
	return err
}

// Stop deletes every instance and snapshot of the daemon (the data dir is
// the benchmark's: this is what stops their VMMs, which outlive the
// daemon), stops the daemon with SIGTERM, and drains its pagers.
func (d *Daemon) Stop(ctx context.Context) error {
	var errs []error
	if err := api.DeleteAll(ctx, d.Client); err != nil {
		errs = append(errs, err)
	}
	d.Client.Close()
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-ctx.Done():
		d.kill()
		errs = append(errs, fmt.Errorf("daemon ignored SIGTERM: %w", ctx.Err()))
	}
	errs = append(errs, drainPagers(ctx, d.DataDir))
	return errors.Join(errs...)
}

func (d *Daemon) kill() {
	_ = d.cmd.Process.Kill()
	<-d.exited
}

// drainPagers asks every pager of the data dir to exit once idle (POST
// /drain on its control socket, DESIGN §7): pagers are detached from the
// daemon and would otherwise outlive the benchmark.
func drainPagers(ctx context.Context, dataDir string) error {
	layout, err := guestdir.New(dataDir)
	if err != nil {
		return err
	}
	socks, _ := filepath.Glob(pager.ControlSocket(filepath.Join(layout.PagerRoot(), "*")))
	var errs []error
	for _, sock := range socks {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := pager.NewClient(sock).Drain(rctx)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("drain pager %s: %w", sock, err))
		}
	}
	return errors.Join(errs...)
}

// tail is the end of a log file, for errors.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil || len(b) == 0 {
		return ""
	}
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return "; log ends:\n" + strings.TrimRight(string(b), "\n")
}
