package nodeplugin

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// TestMountLeak: 1,000 publish/unpublish cycles of mixed volumes, with a plugin restart every
// 100 cycles while volumes are mounted, kubelet-style repeated publishes and unpublishes, leave
// the mount table, the state dir and the pods dir exactly as they were.
func TestMountLeak(t *testing.T) {
	p := startPlugin(t)
	kinds := []struct {
		name     string
		attrs    map[string]string
		readonly bool
	}{
		{"hostdir", hostdirData, false},
		{"hostdir-ro-entry", map[string]string{"type": "hostdir", "name": "shared"}, true},
		{"hostdir-readonly", hostdirData, true},
		{"library-writable", injectorAttrs(), false},
		{"library-readonly", injectorAttrs(), true},
		{"library-single-readonly", map[string]string{"type": "library", "library.0.image": "registry.local/dd-lib-java-init:v1"}, true},
		{"preload", map[string]string{"type": "DatadogInjectorPreload"}, true},
	}
	table, err := mounter.New().MountTable()
	if err != nil {
		t.Fatal(err)
	}
	before := nodeplugintest.MountsUnder(t, p.Root)
	tableBefore := len(table)

	type published struct{ id, target string }
	var live []published
	const cycles, restartEvery, inFlight = 1000, 100, 3
	start := time.Now()
	restarts := 0
	for i := range cycles {
		if i > 0 && i%restartEvery == 0 {
			// Restart with inFlight volumes mounted: they must be kept, not leaked or lost.
			p.Restart()
			restarts++
		}
		k := kinds[i%len(kinds)]
		v := published{id: fmt.Sprintf("csi-%04d", i), target: p.Target(fmt.Sprintf("pod-%04d", i), k.name)}
		p.MustPublish(v.id, v.target, nodeplugintest.Ephemeral(k.attrs, v.id), k.readonly)
		if i%5 == 0 {
			// kubelet repeats a publish after its own restart.
			p.MustPublish(v.id, v.target, nodeplugintest.Ephemeral(k.attrs, v.id), k.readonly)
		}
		live = append(live, v)
		if len(live) > inFlight {
			u := live[0]
			live = live[1:]
			p.MustUnpublish(u.id, u.target)
			if i%7 == 0 {
				p.MustUnpublish(u.id, u.target) // a repeated unpublish is OK too
			}
		}
	}
	for _, u := range live {
		p.MustUnpublish(u.id, u.target)
	}
	elapsed := time.Since(start)

	after := nodeplugintest.MountsUnder(t, p.Root)
	if !slices.Equal(before, after) {
		t.Fatalf("mount table changed:\nbefore %q\nafter  %q", before, after)
	}
	if recs := recordsOnDisk(t, p.State); len(recs) != 0 {
		t.Fatalf("state records left: %d", len(recs))
	}
	if entries, _ := os.ReadDir(filepath.Join(p.State, "overlays")); len(entries) != 0 {
		t.Fatalf("overlay dirs left: %d entries", len(entries))
	}
	targets, _ := filepath.Glob(filepath.Join(p.Kubelet, "pods", "*", "volumes", "kubernetes.io~csi", "*", "mount"))
	if len(targets) != 0 {
		t.Fatalf("%d targets left, e.g. %s", len(targets), targets[0])
	}
	table, _ = mounter.New().MountTable()
	t.Logf("mount leak: %d cycles over %d volume kinds, %d restarts, %d mounts under the test root before and %d after; whole mount table %d before, %d after; %s (%s per cycle)",
		cycles, len(kinds), restarts, len(before), len(after), tableBefore, len(table), elapsed.Round(time.Millisecond), (elapsed / cycles).Round(time.Microsecond))
}

// TestRepeatedPublishOneMount: 100 publishes of one target, across a restart, leave exactly one
// mount.
func TestRepeatedPublishOneMount(t *testing.T) {
	p := startPlugin(t)
	for _, k := range []struct {
		name  string
		attrs map[string]string
	}{{"hostdir", hostdirData}, {"library", injectorAttrs()}} {
		target := p.Target("pod-"+k.name, "v")
		for i := range 100 {
			if i == 50 {
				p.Restart()
			}
			p.MustPublish("csi-"+k.name, target, nodeplugintest.Ephemeral(k.attrs, "pod"), false)
		}
		if n := nodeplugintest.CountMounts(t, target); n != 1 {
			t.Fatalf("%s: 100 publishes left %d mounts, want 1", k.name, n)
		}
		t.Logf("%s: 100 publishes of one target (restart after 50) -> %d mount", k.name, nodeplugintest.CountMounts(t, target))
		p.MustUnpublish("csi-"+k.name, target)
		if n := nodeplugintest.CountMounts(t, target); n != 0 {
			t.Fatalf("%s: %d mounts after unpublish", k.name, n)
		}
	}
}
