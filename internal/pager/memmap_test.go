package pager

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// TestSiblingsShareOneMappingOfTheirMemFile: sessions of one mem-file (two
// names of one inode, as forkd's hardlinked forks) replay from one mapping
// of it, and a session of another file of the same size from its own; a
// mapping outlives the end of a session while another holds it, and the
// last session's end unmaps it. Every replay installs its whole working
// set and every guest reads its own file's bytes. The twins: every
// session with a mapping of its own (the sharing check catches it), and a
// mapping unmapped at any session's end (the surviving sibling's replay
// then reads an unmapped mapping and stops).
func TestSiblingsShareOneMappingOfTheirMemFile(t *testing.T) {
	requireUffd(t)
	for _, tc := range []struct {
		twin string
		cfg  Config
	}{
		{"", Config{}},
		{"with a mapping per session", Config{privateMemMaps: true}},
		{"with a mapping unmapped under its siblings", Config{unmapSharedEarly: true}},
	} {
		checkTwin(t, tc.twin != "", sharedMappingProblems(t, tc.cfg), tc.twin)
	}
}

// sharedMappingProblems runs TestSiblingsShareOneMappingOfTheirMemFile's
// sessions on a pager of cfg and returns what its checks found wrong.
func sharedMappingProblems(t *testing.T, cfg Config) []string {
	hold := make(chan struct{})
	cfg.CacheBytes, cfg.holdPrefetch = cacheBytes, hold
	p := startPager(t, cfg)
	mem := memFile(t, p.dir, testPages, zeroPage, holeLo, holeHi)
	sibling := filepath.Join(p.dir, "memory-sibling")
	if err := os.Link(mem, sibling); err != nil {
		t.Fatal(err)
	}
	other := memFileOf(t, filepath.Join(p.dir, "memory-other"), testPages, func(int) pageFill { return fillData })
	const ws = holeLo // pages [0, holeLo): data, and the zero page
	probes := uint64((ws + probeStride(ws) - 1) / probeStride(ws))
	ctx := context.Background()
	var problems []string
	counts := func(when string, wantMapped, wantHeld int) {
		if mapped, held := p.srv.memMaps.counts(); mapped != wantMapped || held != wantHeld {
			problems = append(problems, fmt.Sprintf("%s: %d mappings held %d times, want %d held %d times", when, mapped, held, wantMapped, wantHeld))
		}
	}

	// a and b: one inode under two names, one cache key; c: another file.
	live := map[string]*consumer{}
	for _, v := range []struct{ id, backing, key, script string }{
		{"a", mem, "abc", "wait"},
		{"b", sibling, "abc", fmt.Sprintf("wait,touch:0-%d,wait", ws)},
		{"c", other, "def", fmt.Sprintf("wait,touch:0-%d,wait", ws)},
	} {
		rec := writeRecording(t, p.dir, v.key, testPages, seqPages(0, ws))
		s, err := p.client.CreateSession(ctx, SessionRequest{SessionID: v.id, BackingPath: v.backing, CacheKey: v.key, PrefetchPath: rec})
		if err != nil {
			t.Fatal(err)
		}
		live[v.id] = startConsumer(t, s.SocketPath, v.backing, testSize, "good", v.script)
		live[v.id].expect("waiting")
	}
	// Each session takes its reference when it starts serving, before its
	// reader (held) reads anything.
	waitFor(t, "every session to hold its mapping", func() bool { _, held := p.srv.memMaps.counts(); return held == 3 })
	counts("with a, b and c live", 2, 3)

	// a ends before any replay has read anything; b's replay reads the
	// mapping a held too.
	live["a"].resume()
	live["a"].finish()
	p.waitSessions(t, 2)
	counts("after a's end", 2, 2)
	close(hold)
	for _, id := range []string{"b", "c"} {
		waitFor(t, id+"'s replay to finish", func() bool { return p.sessionStats(t, id).Prefetch.Done })
		if pf := p.sessionStats(t, id).Prefetch; pf.Error != "" || pf.PagesPrefetched != ws-probes {
			problems = append(problems, fmt.Sprintf("%s: prefetched %d pages (error %q), want %d", id, pf.PagesPrefetched, pf.Error, ws-probes))
		}
		// The consumer checks every page it reads against its own file.
		live[id].resume()
		live[id].expect("waiting")
	}
	for _, id := range []string{"b", "c"} {
		live[id].resume()
		live[id].finish()
	}
	p.waitSessions(t, 0)
	counts("after every session's end", 0, 0)
	return problems
}
