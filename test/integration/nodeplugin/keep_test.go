package nodeplugin

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// testClock is the driver's clock in the kept-layer tests: it moves only when told.
type testClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *testClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

const keptGrace = 10 * time.Minute

// onDiskLayers puts p's writable layers on the state dir's disk, as project quotas do, with
// writablelayer.Fake standing in for the quota itself (kernels without ext4/xfs project
// quotas, such as CI sandboxes, run these tests too; writablelayer's own tests cover the
// quota): the upper and work dirs are plain dirs of the state dir, the overlays real.
func onDiskLayers(p *plugin) {
	layers := writablelayer.NewFake()
	layers.Mech = writablelayer.ProjectQuota
	p.Config.WritableLayers = layers
}

// startKeepingPlugin starts a plugin with --keep-writable-layers, its writable layers on the
// state disk (onDiskLayers), and clock as its clock.
func startKeepingPlugin(t *testing.T, clock *testClock) *plugin {
	t.Helper()
	p := newPlugin(t)
	onDiskLayers(p)
	p.Config.KeepWritableLayers = true
	p.Config.KeptLayerGrace = keptGrace
	p.Config.Now = clock.Now
	p.Start()
	return p
}

// reboot simulates a node reboot for the plugin: it stops, every volume's overlay mount goes
// (the writable layers live on the state disk and have no mount of their own), and a new
// plugin process starts over the same state dir.
func reboot(t *testing.T, p *plugin, targets ...string) {
	t.Helper()
	p.Stop()
	for _, target := range targets {
		if err := unix.Unmount(target, 0); err != nil {
			t.Fatalf("unmount %s: %v", target, err)
		}
	}
	p.Start()
}

// TestKeptWritableLayerSurvivesANodeReboot: with --keep-writable-layers, what a pod wrote into
// its library volume is there again when kubelet publishes the same volume at the same target
// after a node reboot; a plugin restart keeps it too; unpublish removes it.
func TestKeptWritableLayerSurvivesANodeReboot(t *testing.T) {
	p := startKeepingPlugin(t, &testClock{now: time.Unix(1_700_000_000, 0)})
	target := p.Target("pod-a", "apm")
	attrs := nodeplugintest.Ephemeral(injectorAttrs(), "pod-a")
	p.MustPublish("csi-a", target, attrs, false)
	writeFile(t, filepath.Join(target, "tracer.log"), "written before the reboot")

	p.Restart()
	if got := readFile(t, filepath.Join(target, "tracer.log")); got != "written before the reboot" {
		t.Fatalf("after a plugin restart the volume shows %q", got)
	}

	reboot(t, p, target)
	if recs := p.Driver.Records(); len(recs) != 1 || recs[0].VolumeID != "csi-a" {
		t.Fatalf("records after the reboot: %+v, want csi-a's kept", recs)
	}
	p.MustPublish("csi-a", target, attrs, false)
	if got := readFile(t, filepath.Join(target, "tracer.log")); got != "written before the reboot" {
		t.Fatalf("after the reboot and a new publish the volume shows %q", got)
	}
	// Still writable, in the same layer.
	writeFile(t, filepath.Join(target, "after"), "x")

	p.MustUnpublish("csi-a", target)
	if dirs, _ := os.ReadDir(filepath.Join(p.State, "overlays")); len(dirs) != 0 {
		t.Fatalf("overlay dirs after unpublish: %v", dirs)
	}
	if recs := p.Driver.Records(); len(recs) != 0 {
		t.Fatalf("records after unpublish: %+v", recs)
	}
}

// TestKeptWritableLayerOfAGonePodIsRemovedAfterTheGracePeriod: a pod deleted while the node
// was down gets no unpublish; once its dir is gone from kubelet's pods dir for the grace
// period, its kept layer and record are removed (counted in a metric); the kept layer of a
// pod whose dir is still there stays.
func TestKeptWritableLayerOfAGonePodIsRemovedAfterTheGracePeriod(t *testing.T) {
	clock := &testClock{now: time.Unix(1_700_000_000, 0)}
	p := startKeepingPlugin(t, clock)
	gone, stays := p.Target("pod-gone", "apm"), p.Target("pod-stays", "apm")
	p.MustPublish("csi-gone", gone, nodeplugintest.Ephemeral(injectorAttrs(), "pod-gone"), false)
	p.MustPublish("csi-stays", stays, nodeplugintest.Ephemeral(injectorAttrs(), "pod-stays"), false)
	writeFile(t, filepath.Join(gone, "f"), "x")
	writeFile(t, filepath.Join(stays, "f"), "y")
	reboot(t, p, gone, stays)
	// kubelet cleaned up the deleted pod's dir.
	if err := os.RemoveAll(filepath.Join(p.Kubelet, "pods", "pod-gone")); err != nil {
		t.Fatal(err)
	}
	collect := func() int {
		t.Helper()
		n, err := p.Driver.CollectKeptLayers(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := collect(); n != 0 {
		t.Fatalf("removed %d kept layers when the pod dir was first seen gone, want 0", n)
	}
	clock.Advance(keptGrace - time.Second)
	if n := collect(); n != 0 {
		t.Fatalf("removed %d kept layers before the grace period, want 0", n)
	}
	clock.Advance(time.Second)
	if n := collect(); n != 1 {
		t.Fatalf("removed %d kept layers after the grace period, want 1", n)
	}
	recs := p.Driver.Records()
	if len(recs) != 1 || recs[0].VolumeID != "csi-stays" {
		t.Fatalf("records after the collection: %+v, want csi-stays only", recs)
	}
	if dirs, _ := os.ReadDir(filepath.Join(p.State, "overlays")); len(dirs) != 1 {
		t.Fatalf("overlay dirs after the collection: %v, want csi-stays' only", dirs)
	}
	// The pod that still exists gets its volume, with its file, at its next publish.
	p.MustPublish("csi-stays", stays, nodeplugintest.Ephemeral(injectorAttrs(), "pod-stays"), false)
	if got := readFile(t, filepath.Join(stays, "f")); got != "y" {
		t.Fatalf("the kept volume shows %q", got)
	}
	p.MustUnpublish("csi-stays", stays)
}

// TestWritableLayersAreNotKeptByDefault: without --keep-writable-layers a reboot drops the
// records and layers of unmounted volumes, as before.
func TestWritableLayersAreNotKeptByDefault(t *testing.T) {
	p := newPlugin(t)
	onDiskLayers(p)
	p.Start()
	target := p.Target("pod-a", "apm")
	p.MustPublish("csi-a", target, nodeplugintest.Ephemeral(injectorAttrs(), "pod-a"), false)
	writeFile(t, filepath.Join(target, "f"), "x")
	reboot(t, p, target)
	if recs := p.Driver.Records(); len(recs) != 0 {
		t.Fatalf("records after a reboot without --keep-writable-layers: %+v", recs)
	}
	if dirs, _ := os.ReadDir(filepath.Join(p.State, "overlays")); len(dirs) != 0 {
		t.Fatalf("overlay dirs after a reboot without --keep-writable-layers: %v", dirs)
	}
}

// TestKeptWritableLayerGoesOnlyToItsOwnVolume: a kept layer is mounted again only for the
// same volume id at the same target. Another volume id published at that target after the
// reboot gets a fresh, empty layer, and the kept one is removed with the stale record; a
// volume of another pod never reaches it (its target, and so its record key, differ).
func TestKeptWritableLayerGoesOnlyToItsOwnVolume(t *testing.T) {
	p := startKeepingPlugin(t, &testClock{now: time.Unix(1_700_000_000, 0)})
	target, other := p.Target("pod-a", "apm"), p.Target("pod-b", "apm")
	p.MustPublish("csi-a", target, nodeplugintest.Ephemeral(injectorAttrs(), "pod-a"), false)
	writeFile(t, filepath.Join(target, "secret"), "pod-a's")
	reboot(t, p, target)

	p.MustPublish("csi-a", other, nodeplugintest.Ephemeral(injectorAttrs(), "pod-b"), false)
	p.MustPublish("csi-other", target, nodeplugintest.Ephemeral(injectorAttrs(), "pod-a"), false)
	for _, tg := range []string{target, other} {
		if _, err := os.Stat(filepath.Join(tg, "secret")); !os.IsNotExist(err) {
			t.Fatalf("%s shows the kept file of another volume: %v", tg, err)
		}
	}
	if dirs, _ := os.ReadDir(filepath.Join(p.State, "overlays")); len(dirs) != 2 {
		t.Fatalf("overlay dirs: %v, want the two new volumes' only", dirs)
	}
	p.MustUnpublish("csi-a", other)
	p.MustUnpublish("csi-other", target)
}

// TestKeptWritableLayersAboveTheBudgetGoOldestFirst: when the kept layers take more than
// --max-kept-writable-bytes together, the oldest publishes' layers are removed until they fit
// (logged, counted); the newer one stays and its pod finds its file at the next publish.
func TestKeptWritableLayersAboveTheBudgetGoOldestFirst(t *testing.T) {
	clock := &testClock{now: time.Unix(1_700_000_000, 0)}
	p := newPlugin(t)
	onDiskLayers(p)
	p.Config.KeepWritableLayers = true
	p.Config.MaxKeptWritableBytes = 3 << 20
	p.Config.Now = clock.Now
	p.Start()
	targets := map[string]string{}
	for _, pod := range []string{"pod-old", "pod-mid", "pod-new"} {
		targets[pod] = p.Target(pod, "apm")
		p.MustPublish("csi-"+pod, targets[pod], nodeplugintest.Ephemeral(injectorAttrs(), pod), false)
		writeFile(t, filepath.Join(targets[pod], "data"), string(make([]byte, 2<<20)))
		clock.Advance(time.Minute) // the records' publish times differ
	}
	reboot(t, p, targets["pod-old"], targets["pod-mid"], targets["pod-new"])
	n, err := p.Driver.CollectKeptLayers(context.Background())
	if err != nil || n != 2 {
		t.Fatalf("CollectKeptLayers removed %d (%v), want the two oldest of three 2 MiB layers for a 3 MiB budget", n, err)
	}
	recs := p.Driver.Records()
	if len(recs) != 1 || recs[0].VolumeID != "csi-pod-new" {
		t.Fatalf("records after the budget: %+v, want csi-pod-new's only", recs)
	}
	p.MustPublish("csi-pod-new", targets["pod-new"], nodeplugintest.Ephemeral(injectorAttrs(), "pod-new"), false)
	if fi, err := os.Stat(filepath.Join(targets["pod-new"], "data")); err != nil || fi.Size() != 2<<20 {
		t.Fatalf("the newest kept layer after the budget: %v, %v", fi, err)
	}
	p.MustPublish("csi-pod-old", targets["pod-old"], nodeplugintest.Ephemeral(injectorAttrs(), "pod-old"), false)
	if _, err := os.Stat(filepath.Join(targets["pod-old"], "data")); !os.IsNotExist(err) {
		t.Fatalf("the oldest layer was kept over the budget: %v", err)
	}
	for pod, target := range targets {
		if pod != "pod-mid" {
			p.MustUnpublish("csi-"+pod, target)
		}
	}
}
