package emulator

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash/crc64"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// maxVCPUs is Firecracker's limit, and the number of step-counter slots in
// the header page.
const maxVCPUs = 32

// Header page (guest page 0) field offsets.
const (
	hMagic      = 0
	hGeneration = 8
	hLineage    = 16
	hWSPages    = 24
	hTableStart = 32
	hDataStart  = 40
	hSeed       = 48
	hVCPUs      = 56
	hSteps      = 64  // maxVCPUs little-endian uint64 step counters
	hBootID     = 320 // 16 random bytes made at boot (after the step counters)
	// hNet is where the guest keeps its network identity (net.go).
	hNet = 1024
)

const (
	headerMagic  uint64 = 0x31305453_47444b46 // "FKDGST01"
	scratchMagic uint64 = 0x48435441_52435346 // "FSCRATCH"
	tableEntry          = 16                  // version, lineage
	// pageHeader is the data page prefix: index, version, lineage, checksum.
	pageHeader = 32
)

var crcTable = sync.OnceValue(func() *crc64.Table { return crc64.MakeTable(crc64.ECMA) })

var le = binary.LittleEndian

// workloadConfig is what the boot args chose; it is part of the vmstate.
type workloadConfig struct {
	VCPUs      int    `json:"vcpus"`
	WSPages    uint64 `json:"ws_pages"`
	WritePct   uint64 `json:"write_pct"`
	Rate       uint64 `json:"rate"`
	Seed       uint64 `json:"seed"`
	DiscardPct uint64 `json:"discard_pct"`
	// LoadSeed makes every load choose its pages from a seed of its own
	// (drawn from the load's random lineage): forks of one snapshot then
	// touch the same working set in different orders, as guests whose work
	// after a restore depends on what they are asked to do.
	LoadSeed bool `json:"load_seed,omitempty"`
}

// workloadState is the workload's part of the vmstate: its configuration
// and what a real guest would keep in vCPU registers.
type workloadState struct {
	Config     workloadConfig `json:"config"`
	Steps      []uint64       `json:"steps"` // per vCPU; must equal the header's
	Generation uint64         `json:"generation"`
	Lineage    uint64         `json:"lineage"`
}

// GuestStats is the JSON of GET /guest.
type GuestStats struct {
	Ticks               uint64 `json:"ticks"`
	PagesRead           uint64 `json:"pages_read"`
	PagesWritten        uint64 `json:"pages_written"`
	PagesVerified       uint64 `json:"pages_verified"`
	IntegrityErrors     uint64 `json:"integrity_errors"`
	FirstIntegrityError string `json:"first_integrity_error"`
	Steps               uint64 `json:"steps"`
	Generation          uint64 `json:"generation"`
	Lineage             uint64 `json:"lineage"`
	Discards            uint64 `json:"discards"`
	// BootID is random per boot and lives in guest memory, so every fork
	// reports its source's ("" until a loaded guest first runs).
	BootID string `json:"boot_id"`
}

// guestCounters are this process's workload counters, updated by the vCPUs.
type guestCounters struct {
	ticks, pagesRead, pagesWritten, pagesVerified, integrityErrors, discards atomic.Uint64
	first                                                                    atomic.Pointer[string]
}

// workload is the self-checking guest. Its layout in guest RAM: header page,
// version table, working set, free pages (see the package doc).
type workload struct {
	mem *guestMemory
	cfg workloadConfig
	log *slog.Logger

	tableStart, dataStart, freeStart uint64
	// seed chooses the pages of each step: cfg.Seed, or with cfg.LoadSeed
	// a seed of this load's own.
	seed uint64

	// generation and lineage are written into the header at the next resume
	// when headerPending (a fresh boot or a load).
	generation, lineage uint64
	headerPending       bool
	// baseSteps is the sum of the step counters when this process got the
	// guest (0 at boot, the vmstate's on load).
	baseSteps uint64

	// dirty is the dirty log, nil when track_dirty_pages is off. Read and
	// reset by the VMM only while the vCPUs are stopped.
	dirty *dirtyBitmap

	counters guestCounters

	// bootID is the guest's, hex: set at boot, or read from the header when
	// a loaded guest first runs.
	bootID atomic.Pointer[string]

	// steps[k] is vCPU k's step counter ("registers"): owned by vCPU k's
	// goroutine while running, by the VMM (under its lock) while stopped.
	steps []uint64

	stopping atomic.Bool
	stopCh   chan struct{}
	wg       sync.WaitGroup
	running  bool // guarded by the VMM lock
}

// layoutFor fills the table and data offsets from cfg.WSPages.
func (w *workload) layoutFor() {
	tablePages := (w.cfg.WSPages*tableEntry + pageSize - 1) / pageSize
	w.tableStart = 1
	w.dataStart = 1 + tablePages
	w.freeStart = w.dataStart + w.cfg.WSPages
}

// clampWorkingSet returns the largest working set ≤ want that fits in
// pages of guest RAM together with the header and the version table.
func clampWorkingSet(want, pages uint64) uint64 {
	if pages < 3 {
		return 0
	}
	maxWS := (pages - 1) * pageSize / (pageSize + tableEntry)
	for maxWS > 0 && 1+(maxWS*tableEntry+pageSize-1)/pageSize+maxWS > pages {
		maxWS--
	}
	return min(want, maxWS)
}

// newBootWorkload initialises a fresh guest in mem: header, version table
// and every working-set page at version 1, so a Full snapshot right after
// boot already holds real data.
func newBootWorkload(mem *guestMemory, cfg workloadConfig, lineage uint64, dirty *dirtyBitmap, log *slog.Logger) *workload {
	w := &workload{mem: mem, cfg: cfg, log: log, lineage: lineage, dirty: dirty, steps: make([]uint64, cfg.VCPUs), seed: cfg.Seed}
	w.layoutFor()
	h := mem.page(0)
	rand.Read(h[hBootID : hBootID+16]) // never fails
	id := hex.EncodeToString(h[hBootID : hBootID+16])
	w.bootID.Store(&id)
	le.PutUint64(h[hMagic:], headerMagic)
	le.PutUint64(h[hWSPages:], cfg.WSPages)
	le.PutUint64(h[hTableStart:], w.tableStart)
	le.PutUint64(h[hDataStart:], w.dataStart)
	le.PutUint64(h[hSeed:], cfg.Seed)
	le.PutUint64(h[hVCPUs:], uint64(cfg.VCPUs))
	w.headerPending = true
	for j := range cfg.WSPages {
		w.writeVersion(j, 1)
	}
	return w
}

// newLoadedWorkload resumes the guest recorded in a vmstate over restored
// memory. Nothing is checked here: like a real guest, it finds out at its
// first step whether memory and registers agree.
func newLoadedWorkload(mem *guestMemory, st workloadState, lineage uint64, dirty *dirtyBitmap, log *slog.Logger) *workload {
	w := &workload{mem: mem, cfg: st.Config, log: log, generation: st.Generation + 1, lineage: lineage, dirty: dirty,
		steps: append([]uint64(nil), st.Steps...), headerPending: true, seed: st.Config.Seed}
	if st.Config.LoadSeed {
		w.seed = splitmix(st.Config.Seed ^ lineage)
	}
	for _, n := range st.Steps {
		w.baseSteps += n
	}
	w.layoutFor()
	return w
}

func (w *workload) state() workloadState {
	return workloadState{Config: w.cfg, Steps: append([]uint64(nil), w.steps...),
		Generation: w.generation, Lineage: w.lineage}
}

func (w *workload) markDirty(page uint64) {
	if w.dirty != nil {
		w.dirty.mark(page)
	}
}

func splitmix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

func pageSum(pg []byte) uint64 {
	return crc64.Update(crc64.Update(0, crcTable(), pg[:24]), crcTable(), pg[pageHeader:])
}

// writeVersion writes version ver of working-set page j with this process's
// lineage, then its version-table entry.
func (w *workload) writeVersion(j, ver uint64) {
	p := w.dataStart + j
	pg := w.mem.page(p)
	le.PutUint64(pg[0:], p)
	le.PutUint64(pg[8:], ver)
	le.PutUint64(pg[16:], w.lineage)
	x := splitmix(p ^ splitmix(ver^splitmix(w.lineage)))
	for o := pageHeader; o < pageSize; o += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		le.PutUint64(pg[o:], x)
	}
	le.PutUint64(pg[24:], pageSum(pg))
	w.markDirty(p)
	tp := w.tableStart + j*tableEntry/pageSize
	t := w.mem.page(tp)[j*tableEntry%pageSize:]
	le.PutUint64(t[0:], ver)
	le.PutUint64(t[8:], w.lineage)
	w.markDirty(tp)
}

// tableEntryOf returns the version and lineage the table expects for page j.
func (w *workload) tableEntryOf(j uint64) (ver, lin uint64) {
	t := w.mem.page(w.tableStart + j*tableEntry/pageSize)[j*tableEntry%pageSize:]
	return le.Uint64(t[0:]), le.Uint64(t[8:])
}

// verify reads working-set page j and checks it against the version table.
func (w *workload) verify(k int, j uint64) (ver uint64, ok bool) {
	w.counters.pagesRead.Add(1)
	p := w.dataStart + j
	pg := w.mem.page(p)
	ver, lin := w.tableEntryOf(j)
	idx, pv, pl, sum := le.Uint64(pg[0:]), le.Uint64(pg[8:]), le.Uint64(pg[16:]), le.Uint64(pg[24:])
	switch {
	case idx != p:
		w.fail(k, "page %d carries index %d", p, idx)
	case pv != ver || pl != lin:
		w.fail(k, "page %d is version %d lineage %#x, version table says version %d lineage %#x", p, pv, pl, ver, lin)
	case pageSum(pg) != sum:
		w.fail(k, "page %d version %d: checksum mismatch (content corrupted)", p, pv)
	default:
		w.counters.pagesVerified.Add(1)
		return ver, true
	}
	return ver, false
}

// fail records an integrity error: counted, the first kept and logged.
func (w *workload) fail(k int, format string, args ...any) {
	msg := fmt.Sprintf("vcpu %d: ", k) + fmt.Sprintf(format, args...)
	n := w.counters.integrityErrors.Add(1)
	if w.counters.first.CompareAndSwap(nil, &msg) || n <= 10 {
		w.log.Error("guest memory integrity error", "vcpu", k, "error", msg, "count", n)
	}
}

func allZero(pg []byte) bool {
	for o := 0; o < len(pg); o += 8 {
		if le.Uint64(pg[o:]) != 0 {
			return false
		}
	}
	return true
}

// owned is how many of n pages starting at index 0 belong to vCPU k.
func owned(k, vcpus int, n uint64) uint64 {
	if uint64(k) >= n {
		return 0
	}
	return (n - uint64(k) + uint64(vcpus) - 1) / uint64(vcpus)
}

// step is one step of vCPU k at step counter s; it returns the next counter.
func (w *workload) step(k int, s uint64) uint64 {
	w.counters.ticks.Add(1)
	h := w.mem.page(0)
	if m, ws := le.Uint64(h[hMagic:]), le.Uint64(h[hWSPages:]); m != headerMagic || ws != w.cfg.WSPages {
		w.fail(k, "header page corrupt: magic %#x, ws_pages %d (want %d)", m, ws, w.cfg.WSPages)
	} else if hs := le.Uint64(h[hSteps+8*k:]); hs != s {
		w.fail(k, "header records step %d, vCPU state is at step %d: memory and vmstate are from different moments", hs, s)
	}
	n := w.cfg.VCPUs
	r1 := splitmix(w.seed ^ uint64(k)<<56 ^ splitmix(s))
	r2 := splitmix(r1)
	if own := owned(k, n, w.cfg.WSPages); own > 0 {
		j := uint64(k) + uint64(n)*(r1%own)
		if ver, ok := w.verify(k, j); ok && r2%100 < w.cfg.WritePct {
			w.writeVersion(j, ver+1)
			w.counters.pagesWritten.Add(1)
		}
	}
	if w.cfg.DiscardPct > 0 {
		r3 := splitmix(r2)
		nfree := w.mem.pages() - w.freeStart
		if own := owned(k, n, nfree); own > 0 && r3%100 < w.cfg.DiscardPct {
			w.scratch(k, w.freeStart+uint64(k)+uint64(n)*((r3>>8)%own))
		}
	}
	le.PutUint64(h[hSteps+8*k:], s+1)
	w.markDirty(0)
	return s + 1
}

// scratch uses free page f like a guest allocating and freeing memory: a
// zero page gets a scratch pattern; a page holding its scratch pattern is
// discarded (balloon-style) and must then read as zeros.
func (w *workload) scratch(k int, f uint64) {
	pg := w.mem.page(f)
	switch {
	case le.Uint64(pg[0:]) == scratchMagic && le.Uint64(pg[8:]) == f:
		if err := w.mem.discard(f); err != nil {
			w.fail(k, "%v", err)
			return
		}
		w.markDirty(f)
		w.counters.discards.Add(1)
		if !allZero(w.mem.page(f)) {
			w.fail(k, "free page %d is not zero after its discard (removed range resurrected)", f)
		}
	case allZero(pg):
		le.PutUint64(pg[0:], scratchMagic)
		le.PutUint64(pg[8:], f)
		le.PutUint64(pg[pageSize-8:], splitmix(f))
		w.markDirty(f)
	default:
		w.fail(k, "free page %d holds neither zeros nor its scratch pattern", f)
	}
}

// tickInterval is how often a paced vCPU wakes to run its due steps.
const tickInterval = 10 * time.Millisecond

// start runs one goroutine per vCPU until stop. The caller holds the VMM lock.
func (w *workload) start() {
	if w.running {
		return
	}
	if w.headerPending {
		// The VMM's write of the new generation and lineage (a device-style
		// write into guest RAM, so it is dirty-logged like one).
		h := w.mem.page(0)
		le.PutUint64(h[hGeneration:], w.generation)
		le.PutUint64(h[hLineage:], w.lineage)
		w.markDirty(0)
		w.headerPending = false
		if w.bootID.Load() == nil {
			// A loaded guest: its boot id is whatever its memory holds.
			id := hex.EncodeToString(h[hBootID : hBootID+16])
			w.bootID.Store(&id)
		}
	}
	w.stopping.Store(false)
	w.stopCh = make(chan struct{})
	w.running = true
	for k := range w.cfg.VCPUs {
		w.wg.Add(1)
		go w.runVCPU(k)
	}
}

// stop halts every vCPU at a step boundary and waits for them. The caller
// holds the VMM lock.
func (w *workload) stop() {
	if !w.running {
		return
	}
	w.stopping.Store(true)
	close(w.stopCh)
	w.wg.Wait()
	w.running = false
}

func (w *workload) runVCPU(k int) {
	defer w.wg.Done()
	// A vCPU is an OS thread in Firecracker; keep it one here so a uffd
	// fault blocks exactly one thread, as a vCPU's would.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	s := w.steps[k]
	defer func() { w.steps[k] = s }()
	if w.cfg.Rate == 0 {
		for !w.stopping.Load() {
			s = w.step(k, s)
		}
		return
	}
	perSec := float64(w.cfg.Rate) / float64(w.cfg.VCPUs)
	burst := max(1, perSec/10) // never catch up more than 100 ms of backlog at once
	tick := time.NewTicker(tickInterval)
	defer tick.Stop()
	t0 := time.Now()
	var done float64
	for {
		due := time.Since(t0).Seconds()*perSec - done
		if due > burst {
			done += due - burst
			due = burst
		}
		for ; due >= 1; due-- {
			if w.stopping.Load() {
				return
			}
			s = w.step(k, s)
			done++
		}
		select {
		case <-w.stopCh:
			return
		case <-tick.C:
		}
	}
}

func (w *workload) stats() GuestStats {
	st := GuestStats{
		Ticks:           w.counters.ticks.Load(),
		PagesRead:       w.counters.pagesRead.Load(),
		PagesWritten:    w.counters.pagesWritten.Load(),
		PagesVerified:   w.counters.pagesVerified.Load(),
		IntegrityErrors: w.counters.integrityErrors.Load(),
		Discards:        w.counters.discards.Load(),
		Steps:           w.baseSteps + w.counters.ticks.Load(),
		Generation:      w.generation,
		Lineage:         w.lineage,
	}
	if p := w.counters.first.Load(); p != nil {
		st.FirstIntegrityError = *p
	}
	if p := w.bootID.Load(); p != nil {
		st.BootID = *p
	}
	return st
}
