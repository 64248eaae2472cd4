package store

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// BenchmarkInstancesMatching resolves a reference (by name, and by an id
// prefix) among 500 instances, as every operation on an instance does:
// from the store's cache (cache.go), by the indexed query it replaced, and
// by the query before that (the id prefix taken with substr(), a scan of
// every record), in the same run:
//
//	go test -run '^$' -bench InstancesMatching ./internal/store/
func BenchmarkInstancesMatching(b *testing.B) {
	ctx := context.Background()
	s, _ := openTemp(b)
	var last Instance
	for i := range 500 {
		last = Instance{ID: fmt.Sprintf("%08x%016x", uint32(i)*2654435761, i), Name: fmt.Sprintf("vm-%d", i), State: "Standby",
			Vcpus: 1, MemoryMiB: 256, CreatedAt: time.Unix(int64(i), 0).UTC()}
		if err := s.CreateInstance(ctx, last); err != nil {
			b.Fatal(err)
		}
	}
	scan := func(ref string) (int, error) {
		rows, err := s.r().QueryContext(ctx, `SELECT `+instanceCols+` FROM instances`+refMatchByScan, ref, ref, ref)
		if err != nil {
			return 0, err
		}
		defer rows.Close()
		n := 0
		for rows.Next() {
			if _, err := scanInstance(rows); err != nil {
				return 0, err
			}
			n++
		}
		return n, rows.Err()
	}
	cache := func(ref string) (int, error) {
		got, err := s.InstancesMatching(ctx, ref)
		return len(got), err
	}
	index := func(ref string) (int, error) {
		got, err := s.instancesMatchingSQL(ctx, ref)
		return len(got), err
	}
	for _, q := range []struct {
		name string
		find func(string) (int, error)
	}{{"cache", cache}, {"index", index}, {"scan-before", scan}} {
		for _, ref := range []struct{ kind, ref string }{{"name", last.Name}, {"id-prefix", last.ID[:8]}} {
			b.Run(q.name+"/by-"+ref.kind, func(b *testing.B) {
				for b.Loop() {
					if n, err := q.find(ref.ref); err != nil || n != 1 {
						b.Fatalf("%s: %d matches, %v; want 1", ref.ref, n, err)
					}
				}
			})
		}
	}
}
