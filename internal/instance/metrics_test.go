package instance

import (
	"testing"

	"github.com/forkd/forkd/internal/api"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

func TestMetricsCountOperationsAndStates(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := newTestManager(t, func(c *Config) { c.Registerer = reg })
	createRunning(t, m, "src")
	action(t, m, "src", "standby")
	fork(t, m, "src", api.ForkRequest{Name: "f"})
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]*dto.MetricFamily{}
	for _, f := range fams {
		byName[f.GetName()] = f
	}
	label := func(m *dto.Metric, name string) string {
		for _, l := range m.GetLabel() {
			if l.GetName() == name {
				return l.GetValue()
			}
		}
		return ""
	}
	ops := map[string]uint64{}
	for _, mm := range byName["forkd_instance_operation_duration_seconds"].GetMetric() {
		ops[label(mm, "op")] = mm.GetHistogram().GetSampleCount()
	}
	for _, op := range []string{"create", "start", "standby", "fork"} {
		if ops[op] != 1 {
			t.Errorf("operation %s observed %d times, want 1 (all: %v)", op, ops[op], ops)
		}
	}
	states := map[string]float64{}
	for _, mm := range byName["forkd_instances"].GetMetric() {
		states[label(mm, "state")] = mm.GetGauge().GetValue()
	}
	if states[api.StateStandby] != 2 {
		t.Errorf("forkd_instances = %v, want 2 Standby", states)
	}
	// One fork: one group commit of one unit where its dir carries its
	// record (its journal entry and finished record, after its rename), else
	// two (its journal entry and Forking record, then the finished fork).
	want := 2.0
	if m.fs.records {
		want = 1
	}
	for _, name := range []string{"forkd_store_group_commits_total", "forkd_store_group_commit_units_total"} {
		if f := byName[name]; f == nil || f.GetMetric()[0].GetCounter().GetValue() != want {
			t.Errorf("%s = %v, want %v after one fork", name, f, want)
		}
	}
	if up := byName["forkd_pager_up"]; up == nil || up.GetMetric()[0].GetGauge().GetValue() != 0 {
		t.Errorf("forkd_pager_up = %v, want 0 (no pager started)", up)
	}
}

// The manager's copies report a sparse copy that had to move every byte
// (memfile's FullCopy hook) to the log and forkd_memfile_full_copies_total.
func TestFullCopyReachesTheMetric(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := newTestManager(t, func(c *Config) { c.Registerer = reg })
	if m.files.FullCopy == nil {
		t.Fatal("the manager's memfile options have no FullCopy hook: a full copy would go unreported")
	}
	m.files.FullCopy("/data/jail/forkd-vmm/x/root/rootfs.ext4", 1<<20)
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == "forkd_memfile_full_copies_total" {
			if v := f.GetMetric()[0].GetCounter().GetValue(); v != 1 {
				t.Fatalf("forkd_memfile_full_copies_total = %v, want 1", v)
			}
			return
		}
	}
	t.Fatal("forkd_memfile_full_copies_total is not registered")
}
