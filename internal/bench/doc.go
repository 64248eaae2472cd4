// Package bench is forkd's fork-burst benchmark (`forkd bench fork-burst`).
//
// It drives a daemon only through the API (an api.Service, normally the
// typed client of a daemon it started in a temp data dir), so what it
// measures is what users get: for each guest size × fork strategy × restore
// backend × cache temperature it forks N VMs concurrently from one snapshot,
// restores them to Running and reports fork and restore latency
// percentiles, the time until each fork's workload has touched its working
// set, pager hit rates and backing reads, disk reads and allocation, the
// PSS/RSS of the fork VMMs, and every fork's memory_check.
//
// The numbers are only comparable within one run on one machine (the
// machines here are nested VMs where the first touch of a page costs ~10 µs
// and other jobs share the CPUs), so the report puts the
// strategies side by side; it never asserts a timing. Reading /proc and
// /sys is all it does besides API calls; it never touches the data dir's
// files itself (the daemon owns them), except to read VMM sockets to ask the
// emulator how far its workload got.
package bench
