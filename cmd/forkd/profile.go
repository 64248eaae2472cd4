package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
	"runtime/trace"
)

// startProfile writes a CPU profile and an execution trace of this process
// into dir (forkd-<pid>.cpu.pprof, forkd-<pid>.trace) until the returned
// stop is called: `forkd serve --profile DIR`, for benchmarks that want to
// see where the daemon's time goes (`forkd bench fork-burst
// --daemon-profile DIR`). Both run for the daemon's whole life.
func startProfile(dir string) (stop func() error, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("--profile: %w", err)
	}
	base := filepath.Join(dir, fmt.Sprintf("forkd-%d", os.Getpid()))
	cpu, err := os.Create(base + ".cpu.pprof")
	if err != nil {
		return nil, fmt.Errorf("--profile: %w", err)
	}
	tr, err := os.Create(base + ".trace")
	if err != nil {
		cpu.Close()
		return nil, fmt.Errorf("--profile: %w", err)
	}
	if err := pprof.StartCPUProfile(cpu); err != nil {
		cpu.Close()
		tr.Close()
		return nil, fmt.Errorf("--profile: %w", err)
	}
	if err := trace.Start(tr); err != nil {
		pprof.StopCPUProfile()
		cpu.Close()
		tr.Close()
		return nil, fmt.Errorf("--profile: %w", err)
	}
	return func() error {
		trace.Stop()
		pprof.StopCPUProfile()
		return errors.Join(tr.Close(), cpu.Close())
	}, nil
}
